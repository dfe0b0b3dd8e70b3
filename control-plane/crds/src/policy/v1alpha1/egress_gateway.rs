//! `EgressGateway`: sends egress traffic through gateway Services instead of straight out.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{Errors, FieldError, Validate};

/// Routes the mesh's egress traffic through the `global` gateways.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "EgressGateway",
    plural = "egressgateways",
    shortname = "egressgateway",
    namespaced,
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "EgressGateway sends the mesh's egress traffic through gateway Services."
)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewaySpec {
    /// Gateways all egress traffic goes through by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "global")]
    pub global_egress_gateways: Vec<GatewayBindingSubject>,
}

/// A gateway Service, with a weight when there are several.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct GatewayBindingSubject {
    pub service: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

impl Validate for EgressGateway {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        for (i, gw) in self.spec.global_egress_gateways.iter().enumerate() {
            errs.non_empty(format!("spec.global[{i}].service"), &gw.service);
            errs.non_empty(format!("spec.global[{i}].namespace"), &gw.namespace);
            if let Some(w) = gw.weight
                && w < 0
            {
                errs.push(
                    format!("spec.global[{i}].weight"),
                    format!("weight {w} must not be negative"),
                );
            }
        }
        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    #[test]
    fn mesh_core_example() {
        let yaml = r#"
kind: EgressGateway
apiVersion: policy.flomesh.io/v1alpha1
metadata: {name: global-egress-gateway, namespace: fsm}
spec:
  global:
  - service: fsm-egress-gateway
    namespace: fsm
"#;
        let mut gw: EgressGateway = serde_yaml_ng::from_str(yaml).expect("egress gateway");
        assert_eq!(
            gw.spec.global_egress_gateways[0].service,
            "fsm-egress-gateway"
        );
        assert!(gw.validate().is_empty());

        gw.spec.global_egress_gateways.push(GatewayBindingSubject {
            service: String::new(),
            namespace: "fsm".into(),
            weight: Some(-1),
        });
        assert_eq!(
            fields(&gw.validate()),
            ["spec.global[1].service", "spec.global[1].weight"]
        );
    }
}
