//! FSM error codes (E1000-E7005) shared by logs, metrics and the CLI.
//!
//! Every code FSM documents is listed with FSM's verbatim description, so that
//! `fsm support error-info` can print them unchanged.
//!
//! # Rules
//!
//! * **One way to log an error: [`error!`], [`warn!`] (and [`info!`] for a coded failure that
//!   needs no action).** Each takes the code first, then what `tracing`'s macros take; it puts the
//!   code in the field [`FIELD`] (`err_code = "E5010"`, the name of the metric's label, so a log
//!   line and the metric join on it) and counts it once in `fsm_error_err_code_count{err_code}`.
//!   A test (`tests/log_sites.rs`) fails on any `tracing::warn!`/`error!` in the control plane's
//!   crates, which would carry no code or not count it.
//! * **An error returned to a client without being logged** (an HTTP or gRPC answer the caller
//!   acts on) names its code in the answer (`E6103: …`) and is counted with [`count`].
//! * **A code means what FSM's table says.** Where the table has no code for a situation, the
//!   nearest one by description is used and the choice is listed under
//!   [Codes for situations FSM's table does not name](#codes-for-situations-fsms-table-does-not-name).
//!
//! # Codes for situations FSM's table does not name
//!
//! | situation | code | why |
//! |---|---|---|
//! | a source's list or watch failed (any kind; the manifest directory) | E4150 | FSM's informer cache-sync failure; FSM's other informers have no code |
//! | one object or document could not be taken in (defined twice, a field that does not parse, an unreadable ConversionReview) | E3002 | it could not be unmarshalled into what the mesh reads |
//! | a MeshConfig duration that does not parse (`serviceCertValidityDuration`) | E3002 | the same; not E4013, which is a failed certificate issuance |
//! | a log level that is none of FSM's (`fsmLogLevel`, `sidecar.logLevel`) | E1001 | the level could not be set |
//! | a CRD conversion that fails | E3001 | the object could not be marshalled into the version asked for |
//! | a CRD's conversion webhook (`spec.conversion`, with the roots) that cannot be written | E6703 | it is the validating webhook server's, whose configuration is written the same way |
//! | the node id names another proxy UUID or kind than the xDS certificate | E5004 | the proxy cannot be set up for the pod's `fsm-proxy-uuid`; E5010 is only a service account (name or namespace) that differs |
//! | a node id that does not parse (ADS, `/debug/proxies/resources`) | E5001 | the node id has the certificate CN's form |
//! | a proxy over MeshConfig `maxDataPlaneConnections` | E5004 | the proxy is not set up |
//! | a proxy NACKs a response | E5007 | the resources generated for it are not usable |
//! | a response over the gRPC message limit, a status that cannot be written | E5006 | the DiscoveryResponse could not be sent |
//! | the ADS listener cannot accept or hand over connections | E5005 | gRPC connections fail |
//! | a stream's snapshot cache entry vanished | E5008 | the cache lost the proxy's snapshot |
//! | the leader-election Lease cannot be read or written | E4000 | the Lease guards the writing of the bootstrap certificate Secrets |
//! | bootstrap credentials that cannot be written (file or Secret) / listed, read or removed | E4005 / E4000 | the certificate's secret could not be created / retrieved |
//! | a root CA file readable by others | E4015 | the CA given is not as it must be (mode 0600) |
//! | an accept error on a webhook's listener, the injector's metrics listener | E6102 / E6701 | the webhook's HTTP server cannot serve (mutating / validating) |
//! | a flag that cannot be used (`--http-listen`, `--manifest-dir`, the kubeconfig, a Vault CA file over http) | E1000 | an invalid command-line argument |
//! | a fatal error whose messages name no code | E1000 | FSM's start-up group |
//!
//! A metric that cannot be registered (a name clash) is a defect of the build, caught by the
//! metrics tests, not an operational error: it is logged at debug, with no code.

use std::fmt;

/// Declares every code once, with its description, and derives the enum and its tables from
/// that single list.
macro_rules! error_codes {
    ($($code:ident => $description:expr,)*) => {
        /// An FSM error code. `Display` prints the code itself (`E5001`), which is what logs carry
        /// in their `err_code` field ([`FIELD`]) and what the `fsm_error_err_code_count{err_code}`
        /// metric is labelled with.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrCode {
            $($code,)*
        }

        impl ErrCode {
            pub const ALL: &'static [ErrCode] = &[$(ErrCode::$code,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrCode::$code => stringify!($code),)*
                }
            }

            /// The code a message starts with (`"E5010: …"`), for messages whose format puts
            /// the code first.
            pub fn prefix_of(text: &str) -> Option<ErrCode> {
                let code = text.get(..5)?;
                ErrCode::ALL.iter().copied().find(|c| c.as_str() == code)
            }

            /// FSM's description, verbatim (typos included) so CLI output matches FSM's.
            pub fn description(self) -> &'static str {
                match self {
                    $(ErrCode::$code => $description,)*
                }
            }
        }
    };
}

error_codes! {
    E1000 => "An invalid command line argument was passed to the application.",
    E1001 => "The specified log level could not be set in the system.",
    E1002 => "The fsm-controller k8s pod resource was not able to be retrieved by the system.",
    E1003 => "The fsm-injector k8s pod resource was not able to be retrieved by the system.",
    E1004 => "The Ingress client created by the fsm-controller to monitor Ingress resources failed to start.",
    E1005 => "The Reconciler client to monitor updates and deletes to FSM's CRDs and mutating webhook failed to start.",
    E2000 => "An error was encountered while attempting to deduplicate traffic matching attributes (destination port, protocol, IP address etc.) used for matching egress traffic. The applied egress policies could be conflicting with each other, and the system was unable to process affected egress policies.",
    E2001 => "An error was encountered while attempting to deduplicate upstream clusters associated with the egress destination. The applied egress policies could be conflicting with each other, and the system was unable to process affected egress policies.",
    E2002 => "An invalid IP address range was specified in the egress policy. The IP address range must be specified as as a CIDR notation IP address and prefix length, like \"192.0.2.0/24\", as defined in RFC 4632. The invalid IP address range was ignored by the system.",
    E2003 => "An invalid match was specified in the egress policy. The specified match was ignored by the system while applying the egress policy.",
    E2004 => "The SMI HTTPRouteGroup resource specified as a match in an egress policy was not found. Please verify that the specified SMI HTTPRouteGroup resource exists in the same namespace as the egress policy referencing it as a match.",
    E2005 => "The SMI HTTPRouteGroup resources specified as a match in an SMI TrafficTarget policy was unable to be retrieved by the system. The associated SMI TrafficTarget policy was ignored by the system. Please verify that the matches specified for the Traffictarget resource exist in the same namespace as the TrafficTarget policy referencing the match.",
    E2006 => "The SMI HTTPRouteGroup resource is invalid as it does not have any matches specified. The SMI HTTPRouteGroup policy was ignored by the system.",
    E2007 => "There are multiple SMI traffic split policies associated with the same apex(root) service specified in the policies. The system does not support this scenario so onlt the first encountered policy is processed by the system, subsequent policies referring the same apex service are ignored.",
    E2008 => "There was an error adding a route match to an outbound traffic policy representation within the system. The associated route was ignored by the system.",
    E2009 => "The inbound TrafficTargets composed of their routes for a given destination ServiceIdentity could not be configured.",
    E2010 => "An applied SMI TrafficTarget policy has an invalid destination kind.",
    E2011 => "An applied SMI TrafficTarget policy has an invalid source kind.",
    E3000 => "The system found 0 endpoints to be reached when the service's FQDN was resolved.",
    E3001 => "A Kubernetes resource could not be marshalled.",
    E3002 => "A Kubernetes resource could not be unmarshalled.",
    E4000 => "The Kubernetes secret containing the certificate could not be retrieved by the system.",
    E4001 => "The certificate specified by name could not be obtained by key from the secret's data.",
    E4002 => "The private key specified by name could not be obtained by key from the secret's data.",
    E4003 => "The certificate expiration specified by name could not be obtained by key from the secret's data.",
    E4004 => "The certificate expiration obtained from the secret's data by name could not be parsed.",
    E4005 => "The secret containing a certificate could not be created by the system.",
    E4006 => "A private key failed to be generated.",
    E4007 => "The specified private key could be be could not be converted from a DER encoded key to a PEM encoded key.",
    E4008 => "The certificate request fails to be created when attempting to issue a certificate.",
    E4009 => "When creating a new certificate authority, the root certificate could not be obtained by the system.",
    E4010 => "The specified certificate could not be converted from a DER encoded certificate to a PEM encoded certificate.",
    E4011 => "The specified PEM encoded certificate could not be decoded.",
    E4012 => "The specified PEM privateKey for the certificate authority's root certificate could not be decoded.",
    E4013 => "An unspecified error occurred when issuing a certificate from the certificate manager.",
    E4014 => "An error occurred when creating a certificate to issue from the certificate manager.",
    E4015 => "The certificate authority privided when issuing a certificate was invalid.",
    E4016 => "The specified certificate could not be rotated.",
    E4100 => "Failed parsing object into PubSub message.",
    E4150 => "Failed initial cache sync for config.flomesh.io informer.",
    E4151 => "Failed to cast object to MeshConfig.",
    E4152 => "Failed to fetch MeshConfig from cache with specific key.",
    E4153 => "Failed to marshal MeshConfig into other format.",
    E5000 => "A XDS resource could not be marshalled.",
    E5001 => "The XDS certificate common name could not be parsed. The CN should be of the form <proxy-UUID>.<kind>.<proxy-identity>.",
    E5002 => "The proxy UUID obtained from parsing the XDS certificate's common name did not match the fsm-proxy-uuid label value for any pod. The pod associated with the specified Pipy proxy could not be found.",
    E5003 => "A pod in the mesh belongs to more than one service. By Open Service Mesh convention the number of services a pod can belong to is 1. This is a limitation we set in place in order to make the mesh easy to understand and reason about. When a pod belongs to more than one service XDS will not program the Pipy proxy, leaving it out of the mesh.",
    E5004 => "The Pipy proxy data structure created by ADS to reference an Pipy proxy sidecar from a pod's fsm-proxy-uuid label could not be configured.",
    E5005 => "A GRPC connection failure occurred and the ADS is no longer able to receive DiscoveryRequests.",
    E5006 => "The DiscoveryResponse configured by ADS failed to send to the Pipy proxy.",
    E5007 => "The resources to be included in the DiscoveryResponse could not be generated.",
    E5008 => "The aggregated resources generated for a DiscoveryResponse failed to be configured as a new snapshot in the Pipy xDS Aggregate Discovery Services cache.",
    E5009 => "The Aggregate Discovery Server (ADS) created by the FSM controller failed to start.",
    E5010 => "The ServiceAccount referenced in the NodeID does not match the ServiceAccount specified in the proxy certificate. The proxy was not allowed to be a part of the mesh.",
    E5011 => "The gRPC stream was closed by the proxy and no DiscoveryRequests can be received. The Stream Agreggated Resource server was terminated for the specified proxy.",
    E5012 => "The sidecar proxy has not completed the initialization phase and it is not ready to receive broadcast updates from control plane related changes. New versions should not be pushed if the first request has not be received. The broadcast update was ignored for that proxy.",
    E5013 => "The TypeURL of the resource being requested in the DiscoveryRequest is invalid.",
    E5014 => "The version of the DiscoveryRequest could not be parsed by ADS.",
    E5015 => "A proxy egress cluster which routes traffic to its original destination could not be configured. When a Host is not specified in the cluster config, the original destination is used.",
    E5016 => "A proxy egress cluster that routes traffic based on the specified Host resolved using DNS could not be configured.",
    E5017 => "A proxy cluster that corresponds to a specified upstream service could not be configured.",
    E5018 => "The meshed services corresponding a specified Pipy proxy could not be listed.",
    E5019 => "Multiple Pipy clusters with the same name were configured. The duplicate clusters will not be sent to the Pipy proxy in a ClusterDiscovery response.",
    E5020 => "The application protocol specified for a port is not supported for ingress traffic. The XDS filter chain for ingress traffic to the port was not created.",
    E5021 => "An XDS filter chain could not be constructed for ingress.",
    E5022 => "A traffic policy rule could not be configured as an RBAC rule on the proxy. The corresponding rule was ignored by the system.",
    E5023 => "The SDS certificate resource could not be unmarshalled. The corresponding certificate resource was ignored by the system.",
    E5024 => "An XDS secret containing a TLS certificate could not be retrieved. The corresponding secret request was ignored by the system.",
    E5025 => "The SDS secret does not correspond to a MeshService.",
    E5026 => "The SDS secret does not correspond to a ServiceAccount.",
    E5027 => "The identity obtained from the SDS certificate request does not match the The corresponding secret request was ignored by the system.",
    E5028 => "The SDS secret does not correspond to a MeshService.",
    E5029 => "The SDS secret does not correspond to a ServiceAccount.",
    E5030 => "The identity obtained from the SDS certificate request does not match the identity of the proxy. The corresponding certificate request was ignored by the system.",
    E6100 => "A protobuf ProtoMessage could not be converted into YAML.",
    E6101 => "The mutating webhook certificate could not be parsed. The mutating webhook HTTP server was not started.",
    E6102 => "The sidecar injection webhook HTTP server failed to start.",
    E6103 => "An AdmissionRequest could not be decoded.",
    E6104 => "The timeout from an AdmissionRequest could not be parsed.",
    E6105 => "The AdmissionRequest's header was invalid. The content type obtained from the header is not supported.",
    E6106 => "The AdmissionResponse could not be written.",
    E6107 => "The AdmissionRequest was empty.",
    E6108 => "It could not be determined if the pod specified in the AdmissionRequest is enabled for sidecar injection.",
    E6109 => "It could not be determined if the namespace specified in the AdmissionRequest is enabled for sidecar injection.",
    E6110 => "The port exclusions for a pod could not be obtained. No port exclusions are added to the init container's spec.",
    E6111 => "The AdmissionRequest body could not be read.",
    E6112 => "The AdmissionRequest body was nil.",
    E6113 => "The MutatingWebhookConfiguration could not be created.",
    E6114 => "The MutatingWebhookConfiguration could not be updated.",
    E6700 => "An error occurred when shutting down the validating webhook HTTP server.",
    E6701 => "The validating webhook HTTP server failed to start.",
    E6702 => "The validating webhook certificate could not be parsed. The validating webhook HTTP server was not started.",
    E6703 => "The ValidatingWebhookConfiguration could not be created.",
    E7000 => "An error occurred while reconciling the updated CRD to its original state.",
    E7001 => "An error occurred while reconciling the deleted CRD.",
    E7002 => "An error occurred while reconciling the updated mutating webhook to its original state.",
    E7003 => "An error occurred while reconciling the deleted mutating webhook.",
    E7004 => "An error occurred while while reconciling the updated validating webhook to its original state.",
    E7005 => "An error occurred while reconciling the deleted validating webhook.",
}

impl fmt::Display for ErrCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `tracing` field that carries the code of every coded log line.
pub const FIELD: &str = "err_code";

/// Logs an error with its FSM code and counts it: `fsm_errcode::error!(code, fields…, "message")`
/// takes the code first, then what `tracing::error!` takes. See the [crate rules](crate).
#[macro_export]
macro_rules! error {
    ($code:expr, $($rest:tt)+) => {
        $crate::__coded_event!(ERROR, $code, $($rest)+)
    };
}

/// Logs a warning (a recovered error) with its FSM code and counts it, like [`error!`].
#[macro_export]
macro_rules! warn {
    ($code:expr, $($rest:tt)+) => {
        $crate::__coded_event!(WARN, $code, $($rest)+)
    };
}

/// Logs, at info, a coded failure nobody needs to act on (a proxy going away mid-stream), and
/// counts it, like [`error!`].
#[macro_export]
macro_rules! info {
    ($code:expr, $($rest:tt)+) => {
        $crate::__coded_event!(INFO, $code, $($rest)+)
    };
}

/// The one expansion of [`error!`], [`warn!`] and [`info!`]. Counted before the level filter is
/// consulted: the metric moves whatever the log level.
#[doc(hidden)]
#[macro_export]
macro_rules! __coded_event {
    ($level:ident, $code:expr, $($rest:tt)+) => {{
        let code: $crate::ErrCode = $code;
        $crate::count(code);
        $crate::__private::tracing::event!(
            $crate::__private::tracing::Level::$level,
            err_code = code.as_str(),
            $($rest)+
        )
    }};
}

#[doc(hidden)]
pub mod __private {
    pub use tracing;
}

/// Counts one occurrence of `code` in `fsm_error_err_code_count{err_code}` (default registry).
pub fn count(code: ErrCode) {
    if let Some(counter) = counter() {
        counter.with_label_values(&[code.as_str()]).inc();
    }
}

/// How many times `code` has been counted in this process: what `/metrics` shows, for tests.
pub fn counted(code: ErrCode) -> u64 {
    counter().map_or(0, |c| c.with_label_values(&[code.as_str()]).get())
}

/// Registers `fsm_error_err_code_count` in the default registry (done by the first [`count`]
/// otherwise), so that a process exporting metrics lists it before its first error.
pub fn register() {
    counter();
}

fn counter() -> Option<&'static prometheus::IntCounterVec> {
    static COUNTER: std::sync::OnceLock<Option<prometheus::IntCounterVec>> =
        std::sync::OnceLock::new();
    COUNTER
        .get_or_init(|| {
            let counter = prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "fsm_error_err_code_count",
                    "Number of errcodes generated by FSM",
                ),
                &["err_code"],
            )
            .ok()?;
            prometheus::register(Box::new(counter.clone())).ok()?;
            Some(counter)
        })
        .as_ref()
}

/// Implemented by error types that map to an FSM code, so a single helper can find the code for
/// logs, the error metric and status conditions.
pub trait HasErrCode {
    fn err_code(&self) -> ErrCode;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_code_and_every_code_has_a_description() {
        for code in ErrCode::ALL {
            assert_eq!(code.to_string(), format!("{code:?}"));
            assert!(!code.description().is_empty());
            assert_eq!(ErrCode::prefix_of(&format!("{code}: why")), Some(*code));
        }
        assert_eq!(ErrCode::prefix_of("E9999: no"), None);
        assert_eq!(ErrCode::prefix_of("E50"), None);
        assert_eq!(ErrCode::prefix_of("é5010"), None);
    }

    /// A shared buffer the test subscriber writes its lines into.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_macros_log_the_code_as_a_field_and_count_it_once() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        let before = (counted(ErrCode::E5010), counted(ErrCode::E5011));
        tracing::subscriber::with_default(subscriber, || {
            let proxy = "p1";
            crate::warn!(ErrCode::E5010, %proxy, "refusing ADS stream");
            // Below the level: not written, counted all the same.
            crate::info!(ErrCode::E5011, "stream closed");
        });
        assert_eq!(
            (counted(ErrCode::E5010), counted(ErrCode::E5011)),
            (before.0 + 1, before.1 + 1)
        );
        let text = String::from_utf8(lines.0.lock().clone()).expect("utf-8");
        let line: serde_json::Value =
            serde_json::from_str(text.lines().next().unwrap_or_default()).expect("a JSON line");
        assert_eq!(line["fields"][FIELD], "E5010", "{text}");
        assert_eq!(line["fields"]["proxy"], "p1", "{text}");
        assert!(!text.contains("E5011"), "{text}");
    }

    #[test]
    fn count_increments_the_error_metric() {
        count(ErrCode::E5001);
        count(ErrCode::E5001);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::gather())
            .expect("encode");
        assert!(
            text.contains("fsm_error_err_code_count{err_code=\"E5001\"} 2"),
            "{text}"
        );
    }
}
