//! `UpstreamTrafficSetting`: circuit breaking (client side) and local rate limits (upstream
//! side) for one upstream host.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::PolicyStatus;
use crate::validate::{Errors, FieldError, Validate};

/// Connection limits and rate limits for traffic to `host`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "UpstreamTrafficSetting",
    plural = "upstreamtrafficsettings",
    shortname = "upstreamtrafficsetting",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "UpstreamTrafficSetting sets connection limits and rate limits for one upstream host."
)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTrafficSettingSpec {
    /// The upstream: `<svc>.<ns>.svc.cluster.local` (the resource must be in `<ns>`), or the
    /// host of an Egress policy in the same namespace.
    pub host: String,
    /// Circuit-breaking limits, enforced by each client's sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_settings: Option<ConnectionSettingsSpec>,
    /// Rate limits for the whole host, enforced by each upstream instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Per-route HTTP rate limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "httpRoutes")]
    pub http_routes: Vec<HttpRouteSpec>,
}

// === Connection settings ===

/// Circuit-breaking limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct ConnectionSettingsSpec {
    /// Applies to TCP and HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpConnectionSettings>,
    /// Applies to HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConnectionSettings>,
}

// Unset limits mean FSM's default of 2^32-1, which the accessors return.
/// TCP circuit-breaking limits; unset limits are unlimited.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpConnectionSettings {
    /// Maximum connections from one client to all endpoints of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Go duration for establishing a connection; FSM's default is 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
}

impl TcpConnectionSettings {
    pub fn max_connections(&self) -> u32 {
        self.max_connections.unwrap_or(u32::MAX)
    }
}

/// HTTP circuit-breaking limits; unset limits are unlimited.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpConnectionSettings {
    /// Maximum requests in flight from one client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Maximum requests sent over one connection; unset means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Maximum requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Maximum retries in progress from one client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

impl HttpConnectionSettings {
    pub fn max_requests(&self) -> u32 {
        self.max_requests.unwrap_or(u32::MAX)
    }

    pub fn max_pending_requests(&self) -> u32 {
        self.max_pending_requests.unwrap_or(u32::MAX)
    }

    pub fn max_retries(&self) -> u32 {
        self.max_retries.unwrap_or(u32::MAX)
    }
}

// === Rate limits ===

/// Rate limiting for the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct RateLimitSpec {
    /// Token buckets in each upstream instance (no global rate-limit service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalRateLimitSpec>,
}

/// Local (per-instance) rate limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct LocalRateLimitSpec {
    /// Connections per unit; over the limit a connection is closed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpLocalRateLimitSpec>,
    /// Requests per unit, for the whole virtual host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpLocalRateLimitSpec>,
}

/// A connection token bucket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TcpLocalRateLimitSpec {
    /// Connections allowed per `unit`.
    #[schemars(range(min = 1))]
    pub connections: u32,
    pub unit: RateLimitUnit,
    /// Extra connections allowed in a short burst.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub burst: u32,
}

/// A request token bucket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpLocalRateLimitSpec {
    /// Requests allowed per `unit`.
    #[schemars(range(min = 1))]
    pub requests: u32,
    pub unit: RateLimitUnit,
    /// Extra requests allowed in a short burst.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub burst: u32,
    /// Status of rate-limited responses, 400-599; 0 (unset) means 429.
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub response_status_code: u16,
    /// Headers added to rate-limited responses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_add: Vec<HttpHeaderValue>,
}

impl HttpLocalRateLimitSpec {
    /// The status rate-limited requests get.
    pub fn status_code(&self) -> u16 {
        if self.response_status_code == 0 {
            429
        } else {
            self.response_status_code
        }
    }
}

/// Token bucket refill period.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitUnit {
    Second,
    Minute,
    Hour,
}

impl RateLimitUnit {
    pub fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3_600,
        })
    }
}

/// An HTTP header.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct HttpHeaderValue {
    pub name: String,
    pub value: String,
}

/// Settings for the HTTP routes whose path matches `path`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// Path regex; it must be a path an access policy allows (`.*` in permissive mode),
    /// otherwise the limit is ignored.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<HttpPerRouteRateLimitSpec>,
}

/// Rate limits of one route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct HttpPerRouteRateLimitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<HttpLocalRateLimitSpec>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}

// === Validation ===

impl Validate for UpstreamTrafficSetting {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        let spec = &self.spec;

        // FSM's webhook rejects hosts with fewer than two labels.
        let labels: Vec<&str> = spec.host.split('.').collect();
        if labels.len() < 2 || labels.iter().any(|l| l.trim().is_empty()) {
            errs.push(
                "spec.host",
                format!("invalid FQDN {:?} specified as host: expected e.g. \"my-svc.my-namespace.svc.cluster.local\"", spec.host),
            );
        }

        if let Some(tcp) = spec
            .connection_settings
            .as_ref()
            .and_then(|c| c.tcp.as_ref())
            && let Some(timeout) = &tcp.connect_timeout
        {
            errs.duration("spec.connectionSettings.tcp.connectTimeout", timeout, false);
        }

        if let Some(local) = spec.rate_limit.as_ref().and_then(|r| r.local.as_ref()) {
            if let Some(tcp) = &local.tcp
                && tcp.connections == 0
            {
                errs.push(
                    "spec.rateLimit.local.tcp.connections",
                    "connections must be at least 1",
                );
            }
            if let Some(http) = &local.http {
                http_limit(&mut errs, "spec.rateLimit.local.http", http);
            }
        }

        for (i, route) in spec.http_routes.iter().enumerate() {
            let base = format!("spec.httpRoutes[{i}]");
            if route.path.is_empty() {
                errs.push(format!("{base}.path"), "must not be empty");
            } else {
                errs.regex(format!("{base}.path"), &route.path);
            }
            if let Some(local) = route.rate_limit.as_ref().and_then(|r| r.local.as_ref()) {
                http_limit(&mut errs, &format!("{base}.rateLimit.local"), local);
            }
        }
        errs.into_vec()
    }
}

/// The 4xx and 5xx statuses with a name, which FSM's webhook accepts (it refuses 418, say) and
/// Envoy's local rate limit can send (its `HttpStatus` is an enum of named statuses).
pub const NAMED_ERROR_STATUSES: [u16; 37] = [
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421,
    422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
];

fn http_limit(errs: &mut Errors, base: &str, http: &HttpLocalRateLimitSpec) {
    if http.requests == 0 {
        errs.push(format!("{base}.requests"), "requests must be at least 1");
    }
    if http.response_status_code != 0 && !NAMED_ERROR_STATUSES.contains(&http.response_status_code)
    {
        errs.push(
            format!("{base}.responseStatusCode"),
            format!(
                "invalid responseStatusCode {}: must be a named HTTP status in 400-599 (e.g. 429, 503)",
                http.response_status_code
            ),
        );
    }
    for (i, h) in http.response_headers_to_add.iter().enumerate() {
        errs.non_empty(format!("{base}.responseHeadersToAdd[{i}].name"), &h.name);
        errs.non_empty(format!("{base}.responseHeadersToAdd[{i}].value"), &h.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    const EXAMPLE: &str = r#"
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
      connectTimeout: 5s
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

    fn example() -> UpstreamTrafficSetting {
        serde_yaml_ng::from_str(EXAMPLE).expect("uts example")
    }

    #[test]
    fn traffic_policy_example_is_valid() {
        let uts = example();
        assert!(uts.validate().is_empty());
        let http = uts
            .spec
            .connection_settings
            .and_then(|c| c.http)
            .expect("http settings");
        assert_eq!(http.max_requests_per_connection, Some(1));
        let route = uts.spec.http_routes[0]
            .rate_limit
            .as_ref()
            .and_then(|r| r.local.as_ref())
            .expect("route limit");
        assert_eq!(route.status_code(), 429);
        assert_eq!(route.unit.as_duration().as_secs(), 60);
    }

    #[test]
    fn unset_limits_mean_unlimited() {
        let spec: UpstreamTrafficSettingSpec =
            serde_json::from_str(r#"{"host":"httpbin.httpbin.svc.cluster.local","connectionSettings":{"tcp":{},"http":{}}}"#)
                .expect("spec");
        let cs = spec.connection_settings.expect("settings");
        assert_eq!(cs.tcp.expect("tcp").max_connections(), u32::MAX);
        let http = cs.http.expect("http");
        assert_eq!(http.max_requests(), u32::MAX);
        assert_eq!(http.max_pending_requests(), u32::MAX);
        assert_eq!(http.max_retries(), u32::MAX);
        assert_eq!(http.max_requests_per_connection, None);
    }

    #[test]
    fn host_must_be_an_fqdn() {
        for bad in ["httpbin", "", "httpbin.", ".httpbin"] {
            let mut uts = example();
            uts.spec.host = bad.into();
            assert_eq!(fields(&uts.validate()), ["spec.host"], "{bad:?}");
        }
        let mut uts = example();
        uts.spec.host = "httpbin.org".into();
        assert!(uts.validate().is_empty(), "egress hosts are allowed");
    }

    #[test]
    fn rate_limit_rules() {
        let mut uts = example();
        let local = uts
            .spec
            .rate_limit
            .as_mut()
            .and_then(|r| r.local.as_mut())
            .expect("local");
        if let Some(tcp) = local.tcp.as_mut() {
            tcp.connections = 0;
        }
        if let Some(http) = local.http.as_mut() {
            http.response_status_code = 399;
            http.response_headers_to_add[0].value.clear();
        }
        uts.spec.http_routes[0].path = "(".into();
        if let Some(l) = uts.spec.http_routes[0]
            .rate_limit
            .as_mut()
            .and_then(|r| r.local.as_mut())
        {
            l.requests = 0;
            l.response_status_code = 600;
        }
        if let Some(tcp) = uts
            .spec
            .connection_settings
            .as_mut()
            .and_then(|c| c.tcp.as_mut())
        {
            tcp.connect_timeout = Some("5".into());
        }
        assert_eq!(
            fields(&uts.validate()),
            [
                "spec.connectionSettings.tcp.connectTimeout",
                "spec.rateLimit.local.tcp.connections",
                "spec.rateLimit.local.http.responseStatusCode",
                "spec.rateLimit.local.http.responseHeadersToAdd[0].value",
                "spec.httpRoutes[0].path",
                "spec.httpRoutes[0].rateLimit.local.requests",
                "spec.httpRoutes[0].rateLimit.local.responseStatusCode",
            ]
        );
    }

    #[test]
    fn the_status_must_be_a_named_one() {
        for (status, valid) in [
            (0, true),
            (429, true),
            (503, true),
            (418, false),
            (460, false),
        ] {
            let mut uts = example();
            if let Some(http) = uts
                .spec
                .rate_limit
                .as_mut()
                .and_then(|r| r.local.as_mut())
                .and_then(|l| l.http.as_mut())
            {
                http.response_status_code = status;
            }
            assert_eq!(uts.validate().is_empty(), valid, "{status}");
        }
    }

    #[test]
    fn unit_is_a_closed_set() {
        assert!(
            serde_yaml_ng::from_str::<UpstreamTrafficSetting>(
                &EXAMPLE.replace("unit: minute", "unit: day")
            )
            .is_err()
        );
    }
}
