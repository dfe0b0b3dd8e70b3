//! Create, read, update, patch, delete, selectors and discovery through `kube::Api`.

use fsm_test_apiserver::Verb;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Discovery;
use serde_json::json;

use crate::{api_status, config_map, namespace, server};

#[tokio::test]
async fn namespace_create_get_patch_delete() {
    let server = server().await;
    let api: Api<Namespace> = Api::all(server.client());

    let created = api
        .create(&PostParams::default(), &namespace("team-a"))
        .await
        .expect("create");
    let rv = created
        .metadata
        .resource_version
        .clone()
        .expect("resourceVersion");
    assert!(
        rv.parse::<u64>().is_ok(),
        "resourceVersion is an integer string: {rv}"
    );
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(
        created.status.and_then(|s| s.phase).as_deref(),
        Some("Active")
    );

    let patched = api
        .patch(
            "team-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"flomesh.io/monitored-by": "fsm"}}})),
        )
        .await
        .expect("patch");
    assert_eq!(
        patched
            .metadata
            .labels
            .unwrap_or_default()
            .get("flomesh.io/monitored-by")
            .map(String::as_str),
        Some("fsm")
    );
    assert!(
        patched
            .metadata
            .resource_version
            .expect("rv")
            .parse::<u64>()
            .expect("int")
            > rv.parse().expect("int")
    );

    let deleted = api
        .delete("team-a", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(
        deleted.is_left(),
        "namespaces answer DELETE with the object"
    );
    let err = api.get("team-a").await.expect_err("gone");
    let status = api_status(err);
    assert_eq!(status.code, 404);
    assert_eq!(status.reason, "NotFound");
    assert_eq!(status.message, "namespaces \"team-a\" not found");
}

#[tokio::test]
async fn errors_are_real_status_objects() {
    let server = server().await;
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &config_map("default", "one", &[]))
        .await
        .expect("create");

    let status = api_status(
        cms.create(&PostParams::default(), &config_map("default", "one", &[]))
            .await
            .expect_err("duplicate"),
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );
    assert_eq!(status.message, "configmaps \"one\" already exists");
    let details = status.details.expect("details");
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("one", "configmaps")
    );

    let missing_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "nowhere");
    let status = api_status(
        missing_ns
            .create(&PostParams::default(), &config_map("nowhere", "x", &[]))
            .await
            .expect_err("no namespace"),
    );
    assert_eq!(status.code, 404);
    assert_eq!(status.message, "namespaces \"nowhere\" not found");

    let status = api_status(
        cms.create(
            &PostParams::default(),
            &config_map("default", "Not_A_Name", &[]),
        )
        .await
        .expect_err("bad name"),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(status.message.starts_with("ConfigMap \"Not_A_Name\" is invalid: metadata.name: Invalid value: \"Not_A_Name\": a lowercase RFC 1123 subdomain"));
    assert_eq!(
        status.details.expect("details").causes[0].field,
        "metadata.name"
    );

    // Wrong field types in a built-in kind are decoding errors (400), as on a real server.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let bad: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}})).expect("pod");
    let mut raw = serde_json::to_value(&bad).expect("json");
    raw["spec"] = json!({"containers": [{"name": "c", "ports": [{"containerPort": "eighty"}]}]});
    let req = http::Request::post("/api/v1/namespaces/default/pods")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&raw).expect("body"))
        .expect("request");
    let status = api_status(client.request::<Pod>(req).await.expect_err("bad type"));
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
    assert!(
        status
            .message
            .starts_with("Pod in version \"v1\" cannot be handled as a Pod")
    );
    drop(pods);

    // DELETE of a config map answers with a success Status.
    let deleted = cms
        .delete("one", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(deleted.is_right());
}

#[tokio::test]
async fn stale_update_conflicts() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let original = cms
        .create(&PostParams::default(), &config_map("default", "c", &[]))
        .await
        .expect("create");

    let mut first = original.clone();
    first.data = Some([("k".to_string(), "first".to_string())].into());
    let first = cms
        .replace("c", &PostParams::default(), &first)
        .await
        .expect("fresh update");

    let mut stale = original;
    stale.data = Some([("k".to_string(), "stale".to_string())].into());
    let status = api_status(
        cms.replace("c", &PostParams::default(), &stale)
            .await
            .expect_err("stale"),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Operation cannot be fulfilled on configmaps \"c\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // A replace that changes nothing keeps the resourceVersion (no event either).
    let same = cms
        .replace("c", &PostParams::default(), &first)
        .await
        .expect("no-op");
    assert_eq!(
        same.metadata.resource_version,
        first.metadata.resource_version
    );
}

#[tokio::test]
async fn merge_json_strategic_and_apply_patches() {
    let server = server().await;
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &config_map("default", "p", &[("a", "1")]),
    )
    .await
    .expect("create");

    let merged = cms
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": null, "m": "merge"}})),
        )
        .await
        .expect("merge");
    assert_eq!(
        merged.data,
        Some([("m".to_string(), "merge".to_string())].into())
    );

    let strategic = cms
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"data": {"s": "strategic"}})),
        )
        .await
        .expect("strategic");
    assert_eq!(
        strategic
            .data
            .as_ref()
            .and_then(|d| d.get("s"))
            .map(String::as_str),
        Some("strategic")
    );

    // JSON patch (kube's `Patch::Json` needs a feature we do not enable; send it raw).
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/p")
        .header("content-type", "application/json-patch+json")
        .body(
            br#"[{"op":"add","path":"/data/j","value":"json"},{"op":"remove","path":"/data/m"}]"#
                .to_vec(),
        )
        .expect("request");
    let patched: ConfigMap = client.request(req).await.expect("json patch");
    let data = patched.data.unwrap_or_default();
    assert_eq!(data.get("j").map(String::as_str), Some("json"));
    assert!(!data.contains_key("m"));

    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/p")
        .header("content-type", "application/json-patch+json")
        .body(br#"[{"op":"test","path":"/data/j","value":"other"}]"#.to_vec())
        .expect("request");
    let status = api_status(
        client
            .request::<ConfigMap>(req)
            .await
            .expect_err("failed test op"),
    );
    assert_eq!(status.code, 422);

    // Server-side apply: creates when absent, merges when present.
    let ssa = PatchParams::apply("fsm-test").force();
    let applied = cms
        .patch(
            "applied",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "applied"}, "data": {"x": "1"}})),
        )
        .await
        .expect("apply create");
    assert_eq!(
        applied.data,
        Some([("x".to_string(), "1".to_string())].into())
    );
    let applied = cms
        .patch(
            "applied",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "applied"}, "data": {"y": "2"}})),
        )
        .await
        .expect("apply update");
    assert_eq!(applied.data.unwrap_or_default().len(), 2);

    // The real server requires a field manager for apply.
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/applied")
        .header("content-type", "application/apply-patch+yaml")
        .body(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n".to_vec())
        .expect("request");
    let status = api_status(
        client
            .request::<ConfigMap>(req)
            .await
            .expect_err("no field manager"),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(status.message.contains("fieldManager: Required value"));

    // Patching something absent is a 404.
    let status = api_status(
        cms.patch("absent", &PatchParams::default(), &Patch::Merge(json!({})))
            .await
            .expect_err("absent"),
    );
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let server = server().await;
    let store = server.store();
    store.apply(&namespace("other")).expect("ns");
    for (ns, name, labels) in [
        ("default", "web", vec![("app", "web"), ("tier", "front")]),
        ("default", "db", vec![("app", "db"), ("tier", "back")]),
        ("default", "plain", vec![]),
        ("other", "web", vec![("app", "web")]),
    ] {
        store.apply(&config_map(ns, name, &labels)).expect("load");
    }
    let all: Api<ConfigMap> = Api::all(server.client());
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        let mut v: Vec<String> = list
            .items
            .iter()
            .map(|c| {
                format!(
                    "{}/{}",
                    c.metadata.namespace.clone().unwrap_or_default(),
                    c.metadata.name.clone().unwrap_or_default()
                )
            })
            .collect();
        v.sort();
        v
    };
    let cases: [(&str, &[&str]); 8] = [
        ("app=web", &["default/web", "other/web"]),
        ("app==web,tier=front", &["default/web"]),
        ("app!=web", &["default/db", "default/plain"]),
        ("tier", &["default/db", "default/web"]),
        ("!tier", &["default/plain", "other/web"]),
        ("app in (db, web),tier", &["default/db", "default/web"]),
        ("app notin (web)", &["default/db", "default/plain"]),
        (
            "",
            &["default/db", "default/plain", "default/web", "other/web"],
        ),
    ];
    for (selector, expected) in cases {
        let lp = if selector.is_empty() {
            ListParams::default()
        } else {
            ListParams::default().labels(selector)
        };
        assert_eq!(
            names(all.list(&lp).await.expect("list")),
            expected,
            "selector {selector:?}"
        );
    }
    let by_field = all
        .list(&ListParams::default().fields("metadata.name=web,metadata.namespace!=other"))
        .await
        .expect("field list");
    assert_eq!(names(by_field), vec!["default/web"]);

    let status = api_status(
        all.list(&ListParams::default().fields("data.k=v"))
            .await
            .expect_err("unsupported field"),
    );
    assert_eq!(
        (status.code, status.message.as_str()),
        (400, "field label not supported: data.k")
    );
    let status = api_status(
        all.list(&ListParams::default().labels("a in b"))
            .await
            .expect_err("bad selector"),
    );
    assert_eq!(status.code, 400);

    assert!(server.request_count_for(Verb::List, "configmaps") >= 10);
}

#[tokio::test]
async fn discovery_version_and_kubeconfig() {
    let server = server().await;
    let client = server.client();

    let version = client.apiserver_version().await.expect("version");
    assert_eq!(version.major, "1");

    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    assert!(discovery.has_group(""));
    assert!(discovery.has_group("discovery.k8s.io"));
    assert!(discovery.has_group("coordination.k8s.io"));
    assert!(discovery.has_group("apiextensions.k8s.io"));
    let mesh = discovery
        .get("config.flomesh.io")
        .expect("CRD group served");
    let (ar, caps) = mesh.recommended_kind("MeshConfig").expect("MeshConfig");
    assert_eq!(ar.plural, "meshconfigs");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(
        caps.subresources
            .iter()
            .any(|(sub, _)| sub.plural == "meshconfigs/status" || sub.plural == "status")
    );
    let widgets = discovery.get("example.io").expect("widgets group");
    assert_eq!(widgets.preferred_version_or_latest(), "v1");

    let aggregated = Discovery::new(client)
        .run_aggregated()
        .await
        .expect("aggregated discovery");
    assert!(aggregated.get("config.flomesh.io").is_some());
    assert!(aggregated.has_group(""));

    // A kubeconfig file that kube-rs loads like any other.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).expect("client");
    let services: Api<Service> = Api::default_namespaced(client);
    assert!(
        services
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn generate_name_dry_run_metadata_only_and_delete_collection() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "default");

    let mut generated = config_map("default", "", &[("batch", "1")]);
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let created = cms
        .create(&PostParams::default(), &generated)
        .await
        .expect("generateName");
    let name = created.metadata.name.expect("name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    cms.create(&dry, &config_map("default", "dry", &[]))
        .await
        .expect("dry run");
    assert!(
        cms.get_opt("dry").await.expect("get").is_none(),
        "dry runs store nothing"
    );

    cms.create(
        &PostParams::default(),
        &config_map("default", "second", &[("batch", "1")]),
    )
    .await
    .expect("create");
    cms.create(
        &PostParams::default(),
        &config_map("default", "keeper", &[("batch", "2")]),
    )
    .await
    .expect("create");

    // `Accept: …;as=PartialObjectMetadataList` gets metadata only.
    let meta = cms
        .list_metadata(&ListParams::default().labels("batch=1"))
        .await
        .expect("list metadata");
    assert_eq!(meta.items.len(), 2);
    assert_eq!(meta.types.kind, "PartialObjectMetadataList");
    let one = cms.get_metadata("keeper").await.expect("get metadata");
    assert_eq!(
        one.types.as_ref().map(|t| t.kind.as_str()),
        Some("PartialObjectMetadata")
    );

    let deleted = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("batch=1"),
        )
        .await
        .expect("delete collection");
    let deleted = deleted.left().expect("the deleted objects");
    assert_eq!(deleted.items.len(), 2);
    let left: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert_eq!(left, vec!["keeper"]);
    assert_eq!(server.request_count(Verb::DeleteCollection), 1);
}

#[tokio::test]
async fn services_get_cluster_ips_like_a_real_cluster() {
    let server = server().await;
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let svc = |name: &str, ip: Option<&str>| -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 8080}]}
        }))
        .expect("service")
    };
    let created = services
        .create(&PostParams::default(), &svc("web", None))
        .await
        .expect("create");
    let spec = created.spec.expect("spec");
    let ip = spec.cluster_ip.expect("allocated ClusterIP");
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{ip}");
    assert_eq!(spec.cluster_ips, Some(vec![ip.clone()]));
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080))
    );

    let status = api_status(
        services
            .create(&PostParams::default(), &svc("clash", Some(&ip)))
            .await
            .expect_err("taken"),
    );
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("provided IP is already allocated"),
        "{}",
        status.message
    );

    let fixed = services
        .create(&PostParams::default(), &svc("fixed", Some("10.96.0.10")))
        .await
        .expect("explicit IP");
    assert_eq!(
        fixed.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("10.96.0.10")
    );
}
