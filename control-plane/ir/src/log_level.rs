//! FSM's log levels and what a proxy logs at each: one mapping for the injector (a sidecar's
//! `--log-level`, Envoy's `--log-level`, the control plane's own filter) and the compiler (the
//! level sent live to fsm-sidecar, [`crate::MeshSettings::sidecar_log_level`]).
//!
//! FSM's levels, from the most verbose: `trace`, `debug`, `info`, `warn`, `error`, `fatal`,
//! `panic`, `disabled`. As the chart's `fsm.logFilter` maps them: `fatal` and `panic` log errors
//! (FSM logs nothing else at those levels but what ends the process), `disabled` logs nothing.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

// === FsmLevel ===

/// One of FSM's log levels, as MeshConfig and the chart spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FsmLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
    Panic,
    Disabled,
}

impl FsmLevel {
    pub const ALL: [FsmLevel; 8] = [
        FsmLevel::Trace,
        FsmLevel::Debug,
        FsmLevel::Info,
        FsmLevel::Warn,
        FsmLevel::Error,
        FsmLevel::Fatal,
        FsmLevel::Panic,
        FsmLevel::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FsmLevel::Trace => "trace",
            FsmLevel::Debug => "debug",
            FsmLevel::Info => "info",
            FsmLevel::Warn => "warn",
            FsmLevel::Error => "error",
            FsmLevel::Fatal => "fatal",
            FsmLevel::Panic => "panic",
            FsmLevel::Disabled => "disabled",
        }
    }

    /// The most verbose events logged at this level (`fsm.logFilter`'s mapping).
    pub fn log_level(self) -> LogLevel {
        match self {
            FsmLevel::Trace => LogLevel::Trace,
            FsmLevel::Debug => LogLevel::Debug,
            FsmLevel::Info => LogLevel::Info,
            FsmLevel::Warn => LogLevel::Warn,
            FsmLevel::Error | FsmLevel::Fatal | FsmLevel::Panic => LogLevel::Error,
            FsmLevel::Disabled => LogLevel::Off,
        }
    }

    /// fsm-sidecar's `--log-level` (a tracing-subscriber filter).
    pub fn sidecar_filter(self) -> &'static str {
        self.log_level().as_str()
    }

    /// Envoy's `--log-level` (spdlog's levels: `fatal` and `panic` are its `critical`).
    pub fn envoy_level(self) -> &'static str {
        match self {
            FsmLevel::Trace => "trace",
            FsmLevel::Debug => "debug",
            FsmLevel::Info => "info",
            FsmLevel::Warn => "warning",
            FsmLevel::Error => "error",
            FsmLevel::Fatal | FsmLevel::Panic => "critical",
            FsmLevel::Disabled => "off",
        }
    }
}

impl FromStr for FsmLevel {
    type Err = String;

    /// FSM's level names, in any case, blanks around them ignored.
    fn from_str(text: &str) -> Result<Self, String> {
        let wanted = text.trim().to_ascii_lowercase();
        FsmLevel::ALL
            .into_iter()
            .find(|level| level.as_str() == wanted)
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a log level: trace, debug, info, warn, error, fatal, panic or disabled"
                )
            })
    }
}

// === LogLevel ===

/// What a proxy logs: its most verbose level, or nothing (`off`). Spelled as tracing-subscriber
/// spells a default level, so [`LogLevel::as_str`] is a valid filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::Off => "off",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsm_levels_map_as_the_charts_log_filter() {
        let mapped: Vec<(&str, LogLevel, &str, &str)> = FsmLevel::ALL
            .iter()
            .map(|l| {
                (
                    l.as_str(),
                    l.log_level(),
                    l.sidecar_filter(),
                    l.envoy_level(),
                )
            })
            .collect();
        assert_eq!(
            mapped,
            [
                ("trace", LogLevel::Trace, "trace", "trace"),
                ("debug", LogLevel::Debug, "debug", "debug"),
                ("info", LogLevel::Info, "info", "info"),
                ("warn", LogLevel::Warn, "warn", "warning"),
                ("error", LogLevel::Error, "error", "error"),
                ("fatal", LogLevel::Error, "error", "critical"),
                ("panic", LogLevel::Error, "error", "critical"),
                ("disabled", LogLevel::Off, "off", "off"),
            ]
        );
        assert_eq!(" Debug ".parse::<FsmLevel>(), Ok(FsmLevel::Debug));
        assert!("verbose".parse::<FsmLevel>().is_err());
        assert!("".parse::<FsmLevel>().is_err());
        assert!(LogLevel::Off < LogLevel::Error && LogLevel::Debug < LogLevel::Trace);
    }
}
