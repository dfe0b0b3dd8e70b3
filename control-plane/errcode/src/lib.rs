//! FSM error codes (E1000-E7005) shared by logs, metrics and the CLI.
//!
//! Only the codes the control plane raises today are listed; each keeps FSM's verbatim description
//! so that `fsm support error-info` can print them unchanged later.

use std::fmt;

/// An FSM error code. `Display` prints the code itself (`E5001`), which is what logs carry in their
/// `code` field and what the `fsm_error_err_code_count{err_code}` metric is labelled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrCode {
    E1000,
    E3000,
    E3001,
    E3002,
    E4151,
    E5000,
    E5001,
    E5002,
    E5003,
    E5006,
    E5007,
    E5009,
    E5010,
    E5011,
    E5013,
    E5014,
    E5020,
    E5021,
}

impl ErrCode {
    pub const ALL: &'static [ErrCode] = &[
        ErrCode::E1000,
        ErrCode::E3000,
        ErrCode::E3001,
        ErrCode::E3002,
        ErrCode::E4151,
        ErrCode::E5000,
        ErrCode::E5001,
        ErrCode::E5002,
        ErrCode::E5003,
        ErrCode::E5006,
        ErrCode::E5007,
        ErrCode::E5009,
        ErrCode::E5010,
        ErrCode::E5011,
        ErrCode::E5013,
        ErrCode::E5014,
        ErrCode::E5020,
        ErrCode::E5021,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrCode::E1000 => "E1000",
            ErrCode::E3000 => "E3000",
            ErrCode::E3001 => "E3001",
            ErrCode::E3002 => "E3002",
            ErrCode::E4151 => "E4151",
            ErrCode::E5000 => "E5000",
            ErrCode::E5001 => "E5001",
            ErrCode::E5002 => "E5002",
            ErrCode::E5003 => "E5003",
            ErrCode::E5006 => "E5006",
            ErrCode::E5007 => "E5007",
            ErrCode::E5009 => "E5009",
            ErrCode::E5010 => "E5010",
            ErrCode::E5011 => "E5011",
            ErrCode::E5013 => "E5013",
            ErrCode::E5014 => "E5014",
            ErrCode::E5020 => "E5020",
            ErrCode::E5021 => "E5021",
        }
    }

    /// FSM's description, verbatim (typos included) so CLI output matches FSM's.
    pub fn description(self) -> &'static str {
        match self {
            ErrCode::E1000 => "An invalid command line argument was passed to the application.",
            ErrCode::E3000 => {
                "The system found 0 endpoints to be reached when the service's FQDN was resolved."
            }
            ErrCode::E3001 => "A Kubernetes resource could not be marshalled.",
            ErrCode::E3002 => "A Kubernetes resource could not be unmarshalled.",
            ErrCode::E4151 => "Failed to cast object to MeshConfig.",
            ErrCode::E5000 => "A XDS resource could not be marshalled.",
            ErrCode::E5001 => {
                "The XDS certificate common name could not be parsed. The CN should be of the form <proxy-UUID>.<kind>.<proxy-identity>."
            }
            ErrCode::E5002 => {
                "The proxy UUID obtained from parsing the XDS certificate's common name did not match the fsm-proxy-uuid label value for any pod. The pod associated with the specified Pipy proxy could not be found."
            }
            ErrCode::E5003 => {
                "A pod in the mesh belongs to more than one service. By Open Service Mesh convention the number of services a pod can belong to is 1. This is a limitation we set in place in order to make the mesh easy to understand and reason about. When a pod belongs to more than one service XDS will not program the Pipy proxy, leaving it out of the mesh."
            }
            ErrCode::E5006 => {
                "The DiscoveryResponse configured by ADS failed to send to the Pipy proxy."
            }
            ErrCode::E5007 => {
                "The resources to be included in the DiscoveryResponse could not be generated."
            }
            ErrCode::E5009 => {
                "The Aggregate Discovery Server (ADS) created by the FSM controller failed to start."
            }
            ErrCode::E5010 => {
                "The ServiceAccount referenced in the NodeID does not match the ServiceAccount specified in the proxy certificate. The proxy was not allowed to be a part of the mesh."
            }
            ErrCode::E5011 => {
                "The gRPC stream was closed by the proxy and no DiscoveryRequests can be received. The Stream Agreggated Resource server was terminated for the specified proxy."
            }
            ErrCode::E5013 => {
                "The TypeURL of the resource being requested in the DiscoveryRequest is invalid."
            }
            ErrCode::E5014 => "The version of the DiscoveryRequest could not be parsed by ADS.",
            ErrCode::E5020 => {
                "The application protocol specified for a port is not supported for ingress traffic. The XDS filter chain for ingress traffic to the port was not created."
            }
            ErrCode::E5021 => "An XDS filter chain could not be constructed for ingress.",
        }
    }
}

impl fmt::Display for ErrCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts one occurrence of `code` in `fsm_error_err_code_count{err_code}` (default registry).
pub fn count(code: ErrCode) {
    static COUNTER: std::sync::OnceLock<Option<prometheus::IntCounterVec>> =
        std::sync::OnceLock::new();
    let counter = COUNTER.get_or_init(|| {
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
    });
    if let Some(counter) = counter {
        counter.with_label_values(&[code.as_str()]).inc();
    }
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
        }
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
