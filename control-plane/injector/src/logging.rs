//! FSM's log levels: the control plane's own logs, set live from MeshConfig
//! `spec.observability.fsmLogLevel` (fsm-controller and fsm-injector), and the level each injected
//! sidecar starts with, from `spec.sidecar.logLevel`.
//!
//! FSM's levels, from the most verbose: `trace`, `debug`, `info`, `warn`, `error`, `fatal`,
//! `panic`, `disabled`. As the chart's `fsm.logFilter` maps them for `--log-level`: `fatal` and
//! `panic` log errors (FSM logs nothing else at those levels but what ends the process),
//! `disabled` logs nothing.
//!
//! # Rules
//!
//! * **`--log-level` until MeshConfig is read, MeshConfig's level after.** The flag's filter
//!   (tracing-subscriber syntax) is the process's level at start and whenever there is no
//!   MeshConfig; once one is read, its `fsmLogLevel` sets the level, live, while the flag's
//!   per-target directives (`kube=warn`) stay. `disabled` silences everything.
//! * **A level that cannot be set is E1001**, FSM's code for it, and the previous level stays.

use std::str::FromStr;

use fsm_crds::config::v1alpha3::LogLevel as CrdLogLevel;
use fsm_errcode::ErrCode;
use fsm_ir::LogLevel;
use parking_lot::Mutex;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

// === FsmLevel ===

/// FSM's levels and their mapping live in fsm-ir, shared with the compiler (which sends
/// `spec.sidecar.logLevel` to fsm-sidecar live).
pub use fsm_ir::FsmLevel;

/// The most verbose events logged at `level` (`fsm.logFilter`'s mapping).
pub fn level_filter(level: FsmLevel) -> LevelFilter {
    match level.log_level() {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Off => LevelFilter::OFF,
    }
}

/// A MeshConfig CRD level as FSM's.
pub fn from_crd(level: CrdLogLevel) -> FsmLevel {
    match level {
        CrdLogLevel::Trace => FsmLevel::Trace,
        CrdLogLevel::Debug => FsmLevel::Debug,
        CrdLogLevel::Info => FsmLevel::Info,
        CrdLogLevel::Warn => FsmLevel::Warn,
        CrdLogLevel::Error => FsmLevel::Error,
        CrdLogLevel::Fatal => FsmLevel::Fatal,
        CrdLogLevel::Panic => FsmLevel::Panic,
        CrdLogLevel::Disabled => FsmLevel::Disabled,
    }
}

// === LogControl ===

/// The process's log filter, changed live by [`LogControl::set`].
pub struct LogControl {
    /// `--log-level` as given.
    flag: String,
    /// Its directives that name a target (`kube=warn`), kept under MeshConfig's level.
    targets: Vec<String>,
    reload: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>,
    /// The filter in force: `None` for the flag's own.
    current: Mutex<Option<FsmLevel>>,
}

impl LogControl {
    /// Installs the process's subscriber (JSON lines when `json`) filtered by `flag`
    /// (`--log-level`), and returns the handle that changes its level.
    pub fn install(flag: &str, json: bool) -> Result<LogControl, String> {
        let filter = EnvFilter::try_new(flag).map_err(|e| format!("{flag:?}: {e}"))?;
        let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
        let text = (!json).then(tracing_subscriber::fmt::layer);
        let json = json.then(|| tracing_subscriber::fmt::layer().json());
        tracing_subscriber::registry()
            .with(filter)
            .with(text)
            .with(json)
            .try_init()
            .map_err(|e| e.to_string())?;
        LogControl::new(flag, move |filter| {
            handle.reload(filter).map_err(|e| e.to_string())
        })
    }

    /// A control over whatever `reload` applies a filter to (tests, or a subscriber set up
    /// elsewhere); `flag` is the filter in force now.
    pub fn new(
        flag: &str,
        reload: impl Fn(EnvFilter) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<LogControl, String> {
        EnvFilter::try_new(flag).map_err(|e| format!("{flag:?}: {e}"))?;
        let targets = flag
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && LevelFilter::from_str(d).is_err())
            .map(str::to_owned)
            .collect();
        Ok(LogControl {
            flag: flag.to_owned(),
            targets,
            reload: Box::new(reload),
            current: Mutex::new(None),
        })
    }

    /// The filter `level` stands for: the flag's target directives and `level`'s default
    /// (`off` alone for `disabled`); the flag itself for `None`.
    pub fn directives(&self, level: Option<FsmLevel>) -> String {
        match level {
            None => self.flag.clone(),
            Some(FsmLevel::Disabled) => "off".to_owned(),
            Some(level) => self
                .targets
                .iter()
                .cloned()
                .chain([level_filter(level).to_string().to_ascii_lowercase()])
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Sets MeshConfig's level (`None`: no MeshConfig, the flag's filter); nothing happens when
    /// it is already in force. A filter that cannot be applied is logged (E1001) and the
    /// previous one stays.
    pub fn set(&self, level: Option<FsmLevel>) {
        let mut current = self.current.lock();
        if *current == level {
            return;
        }
        let directives = self.directives(level);
        let from = self.directives(*current);
        if directives == from {
            // The same filter (MeshConfig's level is the flag's): nothing to change.
            *current = level;
            return;
        }
        let filter = match EnvFilter::try_new(&directives) {
            Ok(filter) => filter,
            Err(e) => {
                fsm_errcode::error!(ErrCode::E1001, filter = %directives, error = %e, "cannot set the log level; keeping the previous one");
                return;
            }
        };
        // Said under the more verbose of the two filters, so that it is seen either way.
        let louder = level.map_or(LevelFilter::TRACE, level_filter)
            >= current.map_or(LevelFilter::TRACE, level_filter);
        let say = || {
            tracing::info!(%from, to = %directives, level = level.map_or("--log-level", FsmLevel::as_str), "log level set from MeshConfig spec.observability.fsmLogLevel");
        };
        if !louder {
            say();
        }
        match (self.reload)(filter) {
            Ok(()) => {
                *current = level;
                if louder {
                    say();
                }
            }
            Err(e) => {
                fsm_errcode::error!(ErrCode::E1001, filter = %directives, error = %e, "cannot set the log level; keeping the previous one");
            }
        }
    }

    /// MeshConfig's level in force (`None`: the flag's filter).
    pub fn level(&self) -> Option<FsmLevel> {
        *self.current.lock()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn crd_levels_are_fsms() {
        for level in FsmLevel::ALL {
            let crd: CrdLogLevel =
                serde_json::from_value(serde_json::json!(level.as_str())).expect("a CRD level");
            assert_eq!(from_crd(crd), level);
        }
        assert_eq!(level_filter(FsmLevel::Panic), LevelFilter::ERROR);
        assert_eq!(level_filter(FsmLevel::Disabled), LevelFilter::OFF);
    }

    #[test]
    fn meshconfig_sets_the_default_level_and_keeps_the_flags_targets() {
        let applied = Arc::new(Mutex::new(Vec::new()));
        let seen = applied.clone();
        let control = LogControl::new("kube=warn,fsm_xds_server=debug,info", move |filter| {
            seen.lock().push(filter.to_string());
            Ok(())
        })
        .expect("a valid flag");
        assert_eq!(
            control.directives(Some(FsmLevel::Trace)),
            "kube=warn,fsm_xds_server=debug,trace"
        );
        control.set(Some(FsmLevel::Debug));
        control.set(Some(FsmLevel::Debug));
        control.set(Some(FsmLevel::Disabled));
        control.set(Some(FsmLevel::Fatal));
        control.set(None);
        assert_eq!(control.level(), None);
        // The flag's own filter again: nothing to reload.
        control.set(Some(FsmLevel::Info));
        assert_eq!(control.level(), Some(FsmLevel::Info));
        let applied = applied.lock().clone();
        assert_eq!(applied.len(), 4, "once per change: {applied:?}");
        assert!(applied[0].ends_with("debug") && applied[0].contains("kube=warn"));
        assert_eq!(applied[1], "off");
        assert!(applied[2].ends_with("error"));
        assert!(applied[3].contains("fsm_xds_server=debug") && applied[3].ends_with("info"));
    }

    #[test]
    fn a_filter_that_cannot_be_applied_keeps_the_previous_level() {
        let control = LogControl::new("info", |_| Err("no subscriber".into())).expect("valid");
        control.set(Some(FsmLevel::Debug));
        assert_eq!(control.level(), None);
    }

    #[test]
    fn the_reloaded_filter_decides_what_is_logged() {
        let (layer, handle) =
            reload::Layer::<EnvFilter, Registry>::new(EnvFilter::try_new("info").expect("filter"));
        let subscriber = tracing_subscriber::registry().with(layer);
        let control = LogControl::new("info", move |f| handle.reload(f).map_err(|e| e.to_string()))
            .expect("valid");
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            control.set(Some(FsmLevel::Debug));
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            control.set(Some(FsmLevel::Disabled));
            assert!(!tracing::enabled!(tracing::Level::ERROR));
            control.set(None);
            assert!(tracing::enabled!(tracing::Level::INFO));
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
        });
    }
}
