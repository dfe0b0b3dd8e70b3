//! Semantic validation that a CRD schema cannot express (durations, CIDRs, cross-field rules).
//!
//! The schema already rejects wrong types and values outside closed sets; these checks are what
//! FSM's validating webhook and controller add on top. They return every problem at once, each
//! with the JSON path of the offending field, so a status condition or log line can name it.

use std::fmt;
use std::net::IpAddr;

use crate::duration::parse_go_duration;

/// One problem with one field of an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path from the object root, e.g. `spec.certificate.serviceCertValidityDuration`
    /// or `spec.sources[1].name`.
    pub field: String,
    pub message: String,
}

/// Checks an object beyond what its schema enforces. An empty result means valid.
pub trait Validate {
    fn validate(&self) -> Vec<FieldError>;
}

/// Parses `a.b.c.d/n` or `x::y/n` the way Go's `net.ParseCIDR` does (host bits may be set).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    // Go takes only plain decimal digits here; `u8::from_str` would also take a leading `+`.
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

// === Errors ===

/// Collects field errors while walking an object.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn push(&mut self, field: impl fmt::Display, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Requires a Go duration; `allow_zero` is for fields where `0s` means "off".
    pub(crate) fn duration(&mut self, field: impl fmt::Display, value: &str, allow_zero: bool) {
        match parse_go_duration(value) {
            None => self.push(
                field,
                format!("invalid duration {value:?}: expected a Go duration such as \"24h\", \"1m30s\" or \"250ms\""),
            ),
            Some(d) if d.is_zero() && !allow_zero => {
                self.push(field, format!("duration {value:?} must be greater than zero"))
            }
            Some(_) => {}
        }
    }

    pub(crate) fn cidr(&mut self, field: impl fmt::Display, value: &str) {
        if parse_cidr(value).is_none() {
            self.push(
                field,
                format!("invalid CIDR {value:?}: expected notation such as \"10.0.0.0/8\" or \"fd00::/64\""),
            );
        }
    }

    /// Ports are `u16` on the wire already, so only zero is left to reject.
    pub(crate) fn port(&mut self, field: impl fmt::Display, value: u16) {
        if value == 0 {
            self.push(field, "port must be in 1..=65535");
        }
    }

    /// Requires a regex the data planes can compile (Envoy uses RE2, whose syntax the
    /// `regex` family also follows).
    pub(crate) fn regex(&mut self, field: impl fmt::Display, value: &str) {
        if let Err(e) = regex_syntax::Parser::new().parse(value) {
            let reason = e.to_string();
            let reason = reason.lines().last().unwrap_or("invalid syntax").trim();
            self.push(field, format!("invalid regex {value:?}: {reason}"));
        }
    }

    pub(crate) fn non_empty(&mut self, field: impl fmt::Display, value: &str) {
        if value.trim().is_empty() {
            self.push(field, "must not be empty");
        }
    }

    pub(crate) fn into_vec(self) -> Vec<FieldError> {
        self.0
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::FieldError;

    /// The paths of `errors`, for compact assertions.
    pub(crate) fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_matches_go() {
        assert!(parse_cidr("10.0.0.0/8").is_some());
        assert!(parse_cidr("10.0.0.1/32").is_some());
        assert!(parse_cidr("2.2.2.2/24").is_some(), "host bits may be set");
        assert!(parse_cidr("0.0.0.0/0").is_some());
        assert!(parse_cidr("fd00::/64").is_some());
        assert!(parse_cidr("::1/128").is_some());
        for bad in [
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/+8",
            "10.0.0.0/8 ",
            "01.0.0.0/8",
            "example.com/8",
            "",
        ] {
            assert!(parse_cidr(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn error_display_names_the_field() {
        let e = FieldError {
            field: "spec.host".into(),
            message: "must not be empty".into(),
        };
        assert_eq!(e.to_string(), "spec.host: must not be empty");
    }

    #[test]
    fn duration_zero_is_opt_in() {
        let mut errs = Errors::new();
        errs.duration("a", "0s", true);
        errs.duration("b", "0s", false);
        errs.duration("c", "soon", true);
        let errs = errs.into_vec();
        assert_eq!(test_support::fields(&errs), ["b", "c"]);
    }

    #[test]
    fn regex_errors_carry_the_reason() {
        let mut errs = Errors::new();
        errs.regex("ok", ".*a-book.*new");
        errs.regex("bad", "/books(");
        let errs = errs.into_vec();
        assert_eq!(test_support::fields(&errs), ["bad"]);
        assert!(
            errs[0].message.contains("unclosed group"),
            "{}",
            errs[0].message
        );
    }
}
