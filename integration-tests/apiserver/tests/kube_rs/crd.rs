//! Custom resources: CRDs from a directory or created over HTTP, schema validation with real
//! error texts, defaults and pruning, the status subresource, cluster scope and versions.

use std::path::Path;

use fsm_test_apiserver::ApiServer;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};

use crate::{api_status, server};

fn mesh_configs(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("config.flomesh.io", "v1alpha3", "MeshConfig");
    Api::namespaced_with(client, ns, &ApiResource::from_gvk(&gvk))
}

fn widgets(client: kube::Client, version: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("example.io", version, "Widget");
    Api::all_with(client, &ApiResource::from_gvk(&gvk))
}

fn object(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("dynamic object")
}

fn mesh_config(spec: Value) -> DynamicObject {
    object(json!({
        "apiVersion": "config.flomesh.io/v1alpha3",
        "kind": "MeshConfig",
        "metadata": {"name": "fsm-mesh-config", "namespace": "default"},
        "spec": spec,
    }))
}

#[tokio::test]
async fn invalid_custom_resource_is_422_with_causes() {
    let server = server().await;
    let api = mesh_configs(server.client(), "default");
    let err = api
        .create(
            &PostParams::default(),
            &mesh_config(json!({"traffic": {"enableEgress": "string"}})),
        )
        .await
        .expect_err("invalid");
    let status = api_status(err);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        status.message,
        "MeshConfig.config.flomesh.io \"fsm-mesh-config\" is invalid: spec.traffic.enableEgress: Invalid value: \"string\": spec.traffic.enableEgress in body must be of type boolean: \"string\""
    );
    let details = status.details.expect("details");
    assert_eq!(details.kind, "MeshConfig");
    assert_eq!(details.group, "config.flomesh.io");
    assert_eq!(details.causes.len(), 1);
    assert_eq!(details.causes[0].field, "spec.traffic.enableEgress");
    assert_eq!(details.causes[0].reason, "FieldValueTypeInvalid");

    // Several violations: one cause each, bracketed message.
    let err = api
        .create(
            &PostParams::default(),
            &mesh_config(json!({
                "traffic": {"outboundPortExclusionList": [0, 80]},
                "sidecar": {"logLevel": "loud"},
                "certificate": {"serviceCertValidityDuration": "1 day"}
            })),
        )
        .await
        .expect_err("invalid");
    let status = api_status(err);
    let fields: Vec<String> = status
        .details
        .expect("details")
        .causes
        .into_iter()
        .map(|c| c.field)
        .collect();
    assert_eq!(
        fields,
        vec![
            "spec.certificate.serviceCertValidityDuration",
            "spec.sidecar.logLevel",
            "spec.traffic.outboundPortExclusionList[0]",
        ]
    );
    assert!(status.message.contains("is invalid: [spec.certificate.serviceCertValidityDuration: Invalid value: \"1 day\": spec.certificate.serviceCertValidityDuration in body should match '^[0-9]+(h|m|s)$', "));
    assert!(status.message.contains("spec.sidecar.logLevel: Unsupported value: \"loud\": supported values: \"trace\", \"debug\", \"info\", \"warn\", \"error\""));

    // A missing required field.
    let mut no_spec = mesh_config(json!({}));
    no_spec.data = json!({});
    let status = api_status(
        api.create(&PostParams::default(), &no_spec)
            .await
            .expect_err("no spec"),
    );
    assert!(
        status.message.ends_with("is invalid: spec: Required value"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn defaults_pruning_and_generation() {
    let server = server().await;
    let api = mesh_configs(server.client(), "default");
    let created = api
        .create(
            &PostParams::default(),
            &mesh_config(json!({"traffic": {"unknownField": 1}, "sidecar": {"resources": {"limits": {"cpu": "1"}}}, "bogus": true})),
        )
        .await
        .expect("create");
    assert_eq!(
        created.data["spec"]["traffic"]["enableEgress"],
        json!(false),
        "default applied"
    );
    assert_eq!(
        created.data["spec"]["sidecar"]["logLevel"],
        json!("error"),
        "default applied"
    );
    assert!(
        created.data["spec"]["traffic"]
            .get("unknownField")
            .is_none(),
        "pruned"
    );
    assert!(created.data["spec"].get("bogus").is_none(), "pruned");
    assert_eq!(
        created.data["spec"]["sidecar"]["resources"]["limits"]["cpu"],
        json!("1"),
        "preserved"
    );
    assert_eq!(created.metadata.generation, Some(1));

    let labelled = api
        .patch(
            "fsm-mesh-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("label");
    assert_eq!(
        labelled.metadata.generation,
        Some(1),
        "metadata changes keep the generation"
    );
    let changed = api
        .patch(
            "fsm-mesh-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"traffic": {"enableEgress": true}}})),
        )
        .await
        .expect("spec change");
    assert_eq!(changed.metadata.generation, Some(2));

    // Strict field validation rejects what would be pruned.
    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::default()
    };
    let status = api_status(
        api.patch(
            "fsm-mesh-config",
            &strict,
            &Patch::Merge(json!({"spec": {"nope": 1}})),
        )
        .await
        .expect_err("strict"),
    );
    assert_eq!(status.code, 422);
    assert_eq!(
        status.details.expect("details").causes[0].field,
        "spec.nope"
    );

    // Custom resources need a resourceVersion to be replaced.
    let mut unconditional = changed.clone();
    unconditional.metadata.resource_version = None;
    let status = api_status(
        api.replace("fsm-mesh-config", &PostParams::default(), &unconditional)
            .await
            .expect_err("no rv"),
    );
    assert_eq!(status.code, 422);
    assert!(status.message.contains(
        "metadata.resourceVersion: Invalid value: \"0x0\": must be specified for an update"
    ));
}

#[tokio::test]
async fn status_subresource() {
    let server = server().await;
    let api = mesh_configs(server.client(), "default");
    let mut with_status = mesh_config(json!({"traffic": {}}));
    with_status.data["status"] = json!({"phase": "ignored on create"});
    let created = api
        .create(&PostParams::default(), &with_status)
        .await
        .expect("create");
    assert!(
        created.data.get("status").is_none(),
        "status is ignored on create"
    );

    // Status changes through the main endpoint are ignored…
    let mut main = created.clone();
    main.data["status"] = json!({"phase": "nope"});
    main.data["spec"]["traffic"]["enableEgress"] = json!(true);
    let updated = api
        .replace("fsm-mesh-config", &PostParams::default(), &main)
        .await
        .expect("replace");
    assert!(updated.data.get("status").is_none());
    assert_eq!(updated.data["spec"]["traffic"]["enableEgress"], json!(true));
    assert_eq!(updated.metadata.generation, Some(2));

    // …and /status changes only status, without bumping the generation.
    let mut status_write = updated.clone();
    status_write.data["status"] = json!({"phase": "Ready", "observedGeneration": 2});
    status_write.data["spec"]["traffic"]["enableEgress"] = json!(false);
    let after = api
        .replace_status("fsm-mesh-config", &PostParams::default(), &status_write)
        .await
        .expect("replace status");
    assert_eq!(after.data["status"]["phase"], json!("Ready"));
    assert_eq!(
        after.data["spec"]["traffic"]["enableEgress"],
        json!(true),
        "spec untouched by /status"
    );
    assert_eq!(after.metadata.generation, Some(2));

    let patched = api
        .patch_status(
            "fsm-mesh-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Degraded"}})),
        )
        .await
        .expect("patch status");
    assert_eq!(patched.data["status"]["phase"], json!("Degraded"));
    assert_eq!(
        api.get_status("fsm-mesh-config")
            .await
            .expect("get status")
            .data["status"]["observedGeneration"],
        json!(2)
    );

    // Status is validated too.
    let status = api_status(
        api.patch_status(
            "fsm-mesh-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": "two"}})),
        )
        .await
        .expect_err("invalid status"),
    );
    assert_eq!(status.code, 422);
}

#[tokio::test]
async fn crd_created_over_http_becomes_servable_and_deleting_it_removes_objects() {
    let server = ApiServer::builder().start().await.expect("start");
    let client = server.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let text = std::fs::read_to_string(crate::crd_dir().join("meshconfigs.config.flomesh.io.yaml"))
        .expect("fixture");
    let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).expect("crd yaml");

    let status = api_status(
        mesh_configs(client.clone(), "default")
            .list(&Default::default())
            .await
            .expect_err("not served yet"),
    );
    assert_eq!(status.code, 404);

    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    let established = await_condition(
        crds.clone(),
        "meshconfigs.config.flomesh.io",
        conditions::is_crd_established(),
    );
    tokio::time::timeout(std::time::Duration::from_secs(10), established)
        .await
        .expect("established in time")
        .expect("condition");

    let api = mesh_configs(client.clone(), "default");
    api.create(&PostParams::default(), &mesh_config(json!({})))
        .await
        .expect("create CR");
    assert_eq!(
        api.list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    // An invalid CRD is rejected like the real server does.
    let mut bad = crd.clone();
    bad.metadata.name = Some("wrong.name".into());
    let status = api_status(
        crds.create(&PostParams::default(), &bad)
            .await
            .expect_err("bad CRD"),
    );
    assert_eq!(status.code, 422);
    assert!(status.message.contains(
        "metadata.name: Invalid value: \"wrong.name\": must be spec.names.plural+\".\"+spec.group"
    ));

    crds.delete("meshconfigs.config.flomesh.io", &DeleteParams::default())
        .await
        .expect("delete CRD");
    assert!(
        server
            .store()
            .list("config.flomesh.io/v1alpha3", "MeshConfig", None)
            .is_empty()
    );
    let status = api_status(
        api.list(&Default::default())
            .await
            .expect_err("no longer served"),
    );
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn cluster_scoped_and_multiple_versions() {
    let server = server().await;
    let client = server.client();
    let v1 = widgets(client.clone(), "v1");
    let widget = object(json!({"apiVersion": "example.io/v1", "kind": "Widget",
                               "metadata": {"name": "w"}, "spec": {"size": 2, "port": "http"}}));
    let created = v1
        .create(&PostParams::default(), &widget)
        .await
        .expect("create");
    assert!(created.metadata.namespace.is_none());

    let status = api_status(
        v1.create(
            &PostParams::default(),
            &object(
                json!({"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "bad"},
                           "spec": {"size": 0, "port": true}}),
            ),
        )
        .await
        .expect_err("invalid"),
    );
    let fields: Vec<String> = status
        .details
        .expect("details")
        .causes
        .into_iter()
        .map(|c| c.field)
        .collect();
    assert_eq!(fields, vec!["spec.port", "spec.size"]);

    // The same object, served by the other version.
    let beta = widgets(client.clone(), "v1beta1")
        .get("w")
        .await
        .expect("get v1beta1");
    assert_eq!(beta.types.expect("types").api_version, "example.io/v1beta1");

    // Without a status subresource, status is ordinary content and bumps the generation.
    let with_status = v1
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}})),
        )
        .await
        .expect("patch status field");
    assert_eq!(with_status.data["status"]["ready"], json!(true));
    assert_eq!(with_status.metadata.generation, Some(2));
    let status = api_status(v1.get_status("w").await.expect_err("no status subresource"));
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn the_real_fsm_crds_load_when_present() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/fsm/crds");
    if !dir.is_dir() {
        eprintln!("skipping: {} does not exist", dir.display());
        return;
    }
    let server = ApiServer::builder()
        .crd_dir(&dir)
        .start()
        .await
        .expect("all FSM CRDs load");
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    let loaded = crds.list(&Default::default()).await.expect("list CRDs");
    let files = std::fs::read_dir(&dir).expect("read dir").count();
    assert_eq!(loaded.items.len(), files, "one CRD per file");
    for crd in loaded.items {
        for version in crd.spec.versions.iter().filter(|v| v.served) {
            let api_version = format!("{}/{}", crd.spec.group, version.name);
            assert!(
                server.store().is_served(&api_version, &crd.spec.names.kind),
                "{api_version} {} is served",
                crd.spec.names.kind
            );
        }
    }
}
