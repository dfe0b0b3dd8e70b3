//! `Retry`: HTTP retries from one service account to destination Services (needs
//! `featureFlags.enableRetryPolicy`).

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::parse_go_duration;
use crate::validate::{Errors, FieldError, Validate};

/// Retries failed HTTP requests from `source` to `destinations`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "Retry",
    plural = "retries",
    shortname = "retry",
    namespaced,
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "Retry retries failed HTTP requests from a service account to destination Services."
)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// The client service account.
    pub source: RetrySource,
    /// The Services whose failed requests are retried.
    pub destinations: Vec<RetryDestination>,
    /// When and how to retry.
    pub retry_policy: RetryPolicySpec,
}

/// The client a Retry applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RetrySource {
    pub kind: RetrySourceKind,
    pub name: String,
    pub namespace: String,
}

/// Kinds of Retry source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RetrySourceKind {
    ServiceAccount,
}

/// A destination Service of a Retry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RetryDestination {
    pub kind: RetryDestinationKind,
    pub name: String,
    pub namespace: String,
}

/// Kinds of Retry destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RetryDestinationKind {
    Service,
}

// Only `retryOn` is required; the others take the defaults traffic-policy.md §4.2 gives
// (FSM's CRD requires all four, its Go type does not; see that file's §7 item 8).
/// When and how failed requests are retried.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicySpec {
    /// Comma-separated conditions: Envoy `retry_on` names (`5xx`, `retriable-4xx`,
    /// `connect-failure`, ...), status classes (`4xx`) or status codes (`503`).
    pub retry_on: String,
    /// Go duration one attempt may take; unset means only the route's timeout applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Maximum number of retries after the first attempt.
    #[serde(default = "default_num_retries")]
    pub num_retries: u32,
    /// Go duration: base of the exponential back-off, which is capped at 10 times this.
    #[serde(default = "default_backoff_base")]
    pub retry_backoff_base_interval: String,
}

fn default_num_retries() -> u32 {
    1
}

fn default_backoff_base() -> String {
    "25ms".into()
}

impl RetryPolicySpec {
    /// The conditions of `retry_on`, trimmed, empty entries dropped.
    pub fn retry_on_conditions(&self) -> impl Iterator<Item = &str> {
        self.retry_on
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
    }

    /// `per_try_timeout` parsed; `None` when unset or invalid ([`Validate`] reports the latter).
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.per_try_timeout.as_deref().and_then(parse_go_duration)
    }

    /// `retry_backoff_base_interval` parsed, falling back to the 25ms default when invalid.
    pub fn backoff_base(&self) -> Duration {
        parse_go_duration(&self.retry_backoff_base_interval).unwrap_or(Duration::from_millis(25))
    }
}

/// Envoy's `retry_on` condition names (HTTP and gRPC), which FSM inherits from OSM.
const RETRY_ON_NAMES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Also accepts what FSM's Pipy sidecar reads: a status class (`4xx`) or a status code.
fn is_retry_condition(c: &str) -> bool {
    if RETRY_ON_NAMES.contains(&c) {
        return true;
    }
    let b = c.as_bytes();
    match b {
        [d, b'x', b'x'] => (b'1'..=b'5').contains(d),
        [_, _, _] => matches!(c.parse::<u16>(), Ok(code) if (100..=599).contains(&code)),
        _ => false,
    }
}

impl Validate for Retry {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        let spec = &self.spec;

        errs.non_empty("spec.source.name", &spec.source.name);
        errs.non_empty("spec.source.namespace", &spec.source.namespace);
        if spec.destinations.is_empty() {
            errs.push("spec.destinations", "at least one destination is required");
        }
        for (i, d) in spec.destinations.iter().enumerate() {
            errs.non_empty(format!("spec.destinations[{i}].name"), &d.name);
            errs.non_empty(format!("spec.destinations[{i}].namespace"), &d.namespace);
        }

        let policy = &spec.retry_policy;
        if policy.retry_on_conditions().next().is_none() {
            errs.push(
                "spec.retryPolicy.retryOn",
                "at least one retry condition is required",
            );
        }
        for c in policy.retry_on_conditions() {
            if !is_retry_condition(c) {
                errs.push(
                    "spec.retryPolicy.retryOn",
                    format!("unknown retry condition {c:?}; expected e.g. 5xx, retriable-4xx, connect-failure or a status code"),
                );
            }
        }
        if let Some(timeout) = &policy.per_try_timeout {
            errs.duration("spec.retryPolicy.perTryTimeout", timeout, false);
        }
        errs.duration(
            "spec.retryPolicy.retryBackoffBaseInterval",
            &policy.retry_backoff_base_interval,
            false,
        );
        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    const EXAMPLE_1: &str = r#"
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
    namespace: bookstore-v1
  - kind: Service
    name: bookstore
    namespace: bookstore-v2
  retryPolicy:
    retryOn: "5xx"
    perTryTimeout: 3s
    numRetries: 3
    retryBackoffBaseInterval: 1s
"#;

    fn example() -> Retry {
        serde_yaml_ng::from_str(EXAMPLE_1).expect("retry example")
    }

    #[test]
    fn traffic_policy_example_is_valid() {
        let retry = example();
        assert!(retry.validate().is_empty());
        let p = &retry.spec.retry_policy;
        assert_eq!(p.num_retries, 3);
        assert_eq!(p.per_try_timeout(), Some(Duration::from_secs(3)));
        assert_eq!(p.backoff_base(), Duration::from_secs(1));
    }

    #[test]
    fn only_retry_on_is_required() {
        let p: RetryPolicySpec = serde_json::from_str(r#"{"retryOn":"5xx"}"#).expect("policy");
        assert_eq!(p.num_retries, 1);
        assert_eq!(p.retry_backoff_base_interval, "25ms");
        assert_eq!(p.per_try_timeout, None);
        assert!(serde_json::from_str::<RetryPolicySpec>("{}").is_err());
    }

    #[test]
    fn retry_on_conditions() {
        let mut retry = example();
        for ok in [
            "5xx,retriable-4xx",
            "4xx",
            "503, connect-failure",
            "unavailable",
        ] {
            retry.spec.retry_policy.retry_on = ok.into();
            assert!(retry.validate().is_empty(), "{ok}");
        }
        for bad in ["", " , ", "6xx", "700", "sometimes", "5XX"] {
            retry.spec.retry_policy.retry_on = bad.into();
            assert_eq!(
                fields(&retry.validate()),
                ["spec.retryPolicy.retryOn"],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn durations_and_references() {
        let mut retry = example();
        retry.spec.retry_policy.per_try_timeout = Some("3".into());
        retry.spec.retry_policy.retry_backoff_base_interval = "0s".into();
        retry.spec.source.name.clear();
        retry.spec.destinations[1].namespace.clear();
        assert_eq!(
            fields(&retry.validate()),
            [
                "spec.source.name",
                "spec.destinations[1].namespace",
                "spec.retryPolicy.perTryTimeout",
                "spec.retryPolicy.retryBackoffBaseInterval",
            ]
        );
        retry.spec.destinations.clear();
        assert!(fields(&retry.validate()).contains(&"spec.destinations"));
    }

    #[test]
    fn kinds_are_closed_sets() {
        let swapped = EXAMPLE_1.replace("kind: Service\n", "kind: ServiceAccount\n");
        assert!(serde_yaml_ng::from_str::<Retry>(&swapped).is_err());
    }
}
