//! The manifests the spec files quote (mesh-core.md, traffic-policy.md, ingress-gateway.md)
//! parse into the typed CRDs, pass validation, and survive a serialize/parse round trip.

use std::fmt::Debug;

use fsm_crds::config::v1alpha3::{MeshConfig, MeshConfigSpec};
use fsm_crds::policy::v1alpha1 as policy;
use fsm_crds::smi::{access, specs, split};
use fsm_crds::{FieldError, Validate};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Parses, validates and round-trips one document as `T`, returning it.
fn check<T>(doc: &serde_yaml_ng::Value) -> T
where
    T: DeserializeOwned + Serialize + PartialEq + Debug + Validate,
{
    let typed: T =
        serde_yaml_ng::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}\n{}", dump(doc)));
    let errors: Vec<FieldError> = typed.validate();
    assert!(errors.is_empty(), "{errors:?}\n{}", dump(doc));
    let yaml = serde_yaml_ng::to_string(&typed).expect("serialize");
    let again: T = serde_yaml_ng::from_str(&yaml).expect("parse serialized");
    assert_eq!(typed, again);
    let out: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).expect("value");
    assert_eq!(
        out["apiVersion"], doc["apiVersion"],
        "apiVersion is written back"
    );
    assert_eq!(out["kind"], doc["kind"], "kind is written back");
    typed
}

fn dump(doc: &serde_yaml_ng::Value) -> String {
    serde_yaml_ng::to_string(doc).unwrap_or_default()
}

/// Checks every document of a multi-document YAML by its apiVersion and kind; returns the kinds.
fn check_all(yaml: &str) -> Vec<String> {
    let mut kinds = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(yaml) {
        let doc = serde_yaml_ng::Value::deserialize(de).expect("YAML document");
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match (api_version.as_str(), kind.as_str()) {
            ("access.smi-spec.io/v1alpha3", "TrafficTarget") => {
                check::<access::v1alpha3::TrafficTarget>(&doc);
            }
            ("specs.smi-spec.io/v1alpha4", "HTTPRouteGroup") => {
                check::<specs::v1alpha4::HTTPRouteGroup>(&doc);
            }
            ("specs.smi-spec.io/v1alpha4", "TCPRoute") => {
                check::<specs::v1alpha4::TCPRoute>(&doc);
            }
            ("split.smi-spec.io/v1alpha4", "TrafficSplit") => {
                check::<split::v1alpha4::TrafficSplit>(&doc);
            }
            ("split.smi-spec.io/v1alpha2", "TrafficSplit") => {
                check::<split::v1alpha2::TrafficSplit>(&doc);
            }
            ("policy.flomesh.io/v1alpha1", "Egress") => {
                check::<policy::Egress>(&doc);
            }
            ("policy.flomesh.io/v1alpha1", "EgressGateway") => {
                check::<policy::EgressGateway>(&doc);
            }
            ("policy.flomesh.io/v1alpha1", "IngressBackend") => {
                check::<policy::IngressBackend>(&doc);
            }
            ("policy.flomesh.io/v1alpha1", "Retry") => {
                check::<policy::Retry>(&doc);
            }
            ("policy.flomesh.io/v1alpha1", "UpstreamTrafficSetting") => {
                check::<policy::UpstreamTrafficSetting>(&doc);
            }
            ("config.flomesh.io/v1alpha3", "MeshConfig") => {
                check::<MeshConfig>(&doc);
            }
            other => panic!("no type for {other:?}"),
        }
        kinds.push(kind);
    }
    kinds
}

/// mesh-core.md §8.6: one TrafficTarget carrying both TCP and HTTP rules.
const APP_PROTOCOL_SELECTION: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata:
  name: tcp-route
  namespace: default
spec:
  matches:
    ports:
    - 8080
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: http-route
  namespace: default
spec:
  matches:
  - name: version
    pathRegex: "/version"
    methods:
    - GET
---
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata:
  name: test
  namespace: default
spec:
  destination:
    kind: ServiceAccount
    name: sa-1
    namespace: default
  rules:
  - kind: TCPRoute
    name: tcp-route
  - kind: HTTPRouteGroup
    name: http-route
  sources:
  - kind: ServiceAccount
    name: sa-2
    namespace: default
"#;

/// mesh-core.md §13.1 (Dapr): a name-only HTTPRouteGroup match.
const DAPR_SMI: &str = r#"
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata: {name: pythodapp-traffic-target, namespace: dapr-test}
spec:
  destination: {kind: ServiceAccount, name: nodeapp, namespace: dapr-test}
  rules: [{kind: HTTPRouteGroup, name: nodeapp-service-routes, matches: [new-order]}]
  sources: [{kind: ServiceAccount, name: pythonapp, namespace: dapr-test}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: nodeapp-service-routes, namespace: dapr-test}
spec:
  matches:
  - name: new-order
"#;

/// mesh-core.md §13.4: the bookstore demo (header regexes, v1alpha2 split, IngressBackend).
const BOOKSTORE: &str = r#"
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata:
  name: bookstore
  namespace: bookstore
spec:
  destination:
    kind: ServiceAccount
    name: bookstore
    namespace: bookstore
  rules:
  - kind: HTTPRouteGroup
    name: bookstore-service-routes
    matches:
    - buy-a-book
    - books-bought
  sources:
  - kind: ServiceAccount
    name: bookbuyer
    namespace: bookbuyer
  - kind: ServiceAccount
    name: bookthief
    namespace: bookthief
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: bookstore-service-routes
  namespace: bookstore
spec:
  matches:
  - name: books-bought
    pathRegex: /books-bought
    methods:
    - GET
    headers:
    - "user-agent": ".*-http-client/*.*"
    - "client-app": "bookbuyer"
  - name: buy-a-book
    pathRegex: ".*a-book.*new"
    methods:
    - GET
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: bookstore-split
  namespace: bookstore
spec:
  service: bookstore.bookstore
  backends:
  - service: bookstore
    weight: 50
  - service: bookstore-v2
    weight: 50
---
kind: IngressBackend
apiVersion: policy.flomesh.io/v1alpha1
metadata:
  name: bookstore-backend
  namespace: bookstore
spec:
  backends:
  - name: bookstore
    port:
      number: 14001
      protocol: http
  sources:
  - kind: Service
    namespace: osm-nginx-ingess-ns
    name: osm-nginx-ingess-ingress-nginx-controller
"#;

/// mesh-core.md §8.1 and §11.4: egress to the API server and a global egress gateway.
const EGRESS: &str = r#"
kind: Egress
apiVersion: policy.flomesh.io/v1alpha1
metadata: {name: k8s-server-egress, namespace: test}
spec:
  sources:
  - kind: ServiceAccount
    name: curl
    namespace: test
  ipAddresses:
  - 10.0.0.1/32
  ports:
  - number: 443
    protocol: https
---
kind: EgressGateway
apiVersion: policy.flomesh.io/v1alpha1
metadata: {name: global-egress-gateway, namespace: fsm}
spec:
  global:
  - service: fsm-egress-gateway
    namespace: fsm
"#;

/// traffic-policy.md §1.2, §4.4 and §6.1.
const TRAFFIC_POLICY: &str = r#"
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata:
  name: bookstore-split
  namespace: default
spec:
  service: bookstore.default.svc.cluster.local
  backends:
  - service: bookstore-v1
    weight: 90
  - service: bookstore-v2
    weight: 10
---
kind: Retry
apiVersion: policy.flomesh.io/v1alpha1
metadata:
  name: retry
spec:
  source:
    kind: ServiceAccount
    name: bookbuyer
    namespace: bookbuyer
  destinations:
  - kind: Service
    name: bookstore
    namespace: bookstore-v2
  retryPolicy:
    retryOn: "5xx,retriable-4xx"
    perTryTimeout: 4s
    numRetries: 5
    retryBackoffBaseInterval: 2ms
---
apiVersion: policy.flomesh.io/v1alpha1
kind: UpstreamTrafficSetting
metadata:
  name: bookstore
  namespace: bookstore
spec:
  host: bookstore.bookstore.svc.cluster.local
  connectionSettings:
    tcp:
      maxConnections: 100
    http:
      maxPendingRequests: 10
      maxRequests: 100
      maxRequestsPerConnection: 1
      maxRetries: 3
  rateLimit:
    local:
      tcp:
        connections: 100
        unit: minute
        burst: 10
      http:
        requests: 10
        unit: second
        burst: 5
        responseStatusCode: 429
        responseHeadersToAdd:
        - name: x-rate-limited
          value: "true"
  httpRoutes:
  - path: .*
    rateLimit:
      local:
        requests: 3
        unit: minute
"#;

/// ingress-gateway.md AS-IB-01..03: Service, IPRange and AuthenticatedPrincipal sources.
const INGRESS_BACKENDS: &str = r#"
kind: IngressBackend
apiVersion: policy.flomesh.io/v1alpha1
metadata: {name: basic, namespace: test}
spec:
  backends: [{name: foo, port: {number: 80, protocol: http}}]
  sources: [{kind: Service, namespace: fsm-system, name: fsm-ingress}]
---
kind: IngressBackend
apiVersion: policy.flomesh.io/v1alpha1
metadata: {name: ip-range, namespace: test}
spec:
  backends: [{name: foo, port: {number: 80, protocol: http}}]
  sources: [{kind: IPRange, name: 10.0.0.0/8}]
---
kind: IngressBackend
apiVersion: policy.flomesh.io/v1alpha1
metadata: {name: https, namespace: test}
spec:
  backends:
  - name: foo
    port: {number: 80, protocol: https}
    tls: {skipClientCertValidation: false}
  sources: [{kind: AuthenticatedPrincipal, name: client.default.svc.cluster.local}]
"#;

#[test]
fn mesh_core_examples() {
    assert_eq!(
        check_all(APP_PROTOCOL_SELECTION),
        ["TCPRoute", "HTTPRouteGroup", "TrafficTarget"]
    );
    assert_eq!(check_all(DAPR_SMI), ["TrafficTarget", "HTTPRouteGroup"]);
    assert_eq!(
        check_all(BOOKSTORE),
        [
            "TrafficTarget",
            "HTTPRouteGroup",
            "TrafficSplit",
            "IngressBackend"
        ]
    );
    assert_eq!(check_all(EGRESS), ["Egress", "EgressGateway"]);
}

#[test]
fn traffic_policy_examples() {
    assert_eq!(
        check_all(TRAFFIC_POLICY),
        ["TrafficSplit", "Retry", "UpstreamTrafficSetting"]
    );
}

#[test]
fn ingress_backend_examples() {
    assert_eq!(check_all(INGRESS_BACKENDS).len(), 3);
}

#[test]
fn bookstore_header_matches_merge() {
    let doc = serde_yaml_ng::Deserializer::from_str(BOOKSTORE)
        .nth(1)
        .map(|de| serde_yaml_ng::Value::deserialize(de).expect("YAML document"))
        .expect("second document");
    let group: specs::v1alpha4::HTTPRouteGroup = check(&doc);
    let headers = group.spec.matches[0].header_map();
    assert_eq!(headers.get("client-app"), Some(&"bookbuyer"));
    assert_eq!(headers.get("user-agent"), Some(&".*-http-client/*.*"));
}

#[test]
fn empty_spec_mesh_config_is_fsm_defaults() {
    let yaml = r#"
apiVersion: config.flomesh.io/v1alpha3
kind: MeshConfig
metadata:
  name: fsm-mesh-config
  namespace: fsm-system
spec: {}
"#;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).expect("yaml");
    let mc: MeshConfig = check(&doc);
    assert_eq!(mc.spec, MeshConfigSpec::default());

    // mesh-core.md §0.5, key by key.
    let s = &mc.spec;
    assert!(!s.traffic.enable_egress);
    assert!(!s.traffic.enable_permissive_traffic_policy_mode);
    assert!(!s.traffic.use_https_ingress);
    assert!(s.traffic.outbound_port_exclusion_list.is_empty());
    assert!(s.traffic.outbound_ip_range_exclusion_list.is_empty());
    assert!(s.traffic.outbound_ip_range_inclusion_list.is_empty());
    assert!(s.traffic.inbound_port_exclusion_list.is_empty());
    assert_eq!(s.certificate.service_cert_validity_duration, "24h");
    assert!(!s.observability.enable_debug_server);
    assert!(!s.observability.tracing.enable);
    assert_eq!(
        s.observability.tracing.address_or_default("fsm-system"),
        "jaeger.fsm-system.svc.cluster.local"
    );
    assert_eq!(s.observability.tracing.endpoint, "/api/v2/spans");
    assert_eq!(s.observability.tracing.port, 9411);
    assert!(!s.sidecar.enable_privileged_init_container);
    assert_eq!(s.sidecar.log_level, "error");
    assert_eq!(s.sidecar.max_data_plane_connections, 0);
    assert_eq!(s.sidecar.config_resync_interval, "0s");
    assert_eq!(s.sidecar.sidecar_image, "");
}

#[test]
fn documented_mesh_config_patches_apply() {
    // The merge patches FSM's docs apply with `kubectl patch meshconfig ... --type=merge`.
    let patches = [
        r#"{"spec":{"traffic":{"enableEgress":true}}}"#,
        r#"{"spec":{"traffic":{"enablePermissiveTrafficPolicyMode":true}}}"#,
        r#"{"spec":{"traffic":{"outboundIPRangeExclusionList":["10.0.0.1/32"]}}}"#,
        r#"{"spec":{"traffic":{"outboundPortExclusionList":[50005,8201,6379]}}}"#,
        r#"{"spec":{"featureFlags":{"enableEgressPolicy":true},"traffic":{"enableEgress":false}}}"#,
        r#"{"spec":{"sidecar":{"sidecarImage": "flomesh/pipy:latest"}}}"#,
        r#"{"spec":{"observability":{"tracing":{"enable":true,"address": "jaeger.fsm-system.svc.cluster.local","port":9411,"endpoint":"/api/v2/spans"}}}}"#,
        r#"{"spec":{"ingress":{"tls":{"enabled":true}}}}"#,
    ];
    for patch in patches {
        let mut object = serde_json::json!({
            "apiVersion": "config.flomesh.io/v1alpha3",
            "kind": "MeshConfig",
            "metadata": {"name": "fsm-mesh-config", "namespace": "fsm-system"},
            "spec": {},
        });
        merge(
            &mut object,
            &serde_json::from_str(patch).expect("patch JSON"),
        );
        let mc: MeshConfig = serde_json::from_value(object).expect(patch);
        assert!(mc.validate().is_empty(), "{patch}");
    }

    // The rejected patch of mesh-core.md §0.5 fails to parse, as it fails the schema.
    let bad = serde_json::json!({
        "apiVersion": "config.flomesh.io/v1alpha3",
        "kind": "MeshConfig",
        "metadata": {"name": "fsm-mesh-config"},
        "spec": {"traffic": {"enableEgress": "no"}},
    });
    assert!(serde_json::from_value::<MeshConfig>(bad).is_err());
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}
