//! The sidecar's log filter: `--log-level` at start, then the level the control plane sends in
//! the `Runtime` resource (MeshConfig `spec.sidecar.logLevel`), changed live.
//!
//! The rule is the control plane's own (`fsm_injector::logging::LogControl`, which keeps
//! fsm-controller's level at MeshConfig `fsmLogLevel`): a level replaces the flag's default and
//! keeps its per-target directives (`fsm_sidecar_xds=debug`); `off` silences everything; no level
//! is the flag's filter again. Written again here because that crate pulls kube and the CRDs,
//! which a sidecar must not carry.

use std::str::FromStr;
use std::sync::Arc;

use fsm_sidecar_proxy::StoreSink;
use fsm_sidecar_xds::{ConfigSink, ResourceSet};
use parking_lot::Mutex;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The process's log filter, changed live by [`LogControl::set`].
pub struct LogControl {
    /// `--log-level` as given.
    flag: String,
    /// Its directives that name a target, kept under the control plane's level.
    targets: Vec<String>,
    reload: Reload,
    /// The level in force: `None` for the flag's own filter.
    current: Mutex<Option<LevelFilter>>,
}

/// The config store's sink that also applies the `Runtime` log level once a config is accepted;
/// a refused one (NACK) changes nothing.
pub struct Sink {
    pub store: StoreSink,
    pub log: Arc<LogControl>,
}

// === LogControl ===

impl LogControl {
    /// Installs the process's subscriber, filtered by `flag` (`--log-level`), and returns the
    /// handle that changes its level.
    pub fn install(flag: &str) -> Result<LogControl, String> {
        let filter = EnvFilter::try_new(flag).map_err(|e| format!("{flag:?}: {e}"))?;
        let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    // Colour codes only help a terminal; in a container log they are noise.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .try_init()
            .map_err(|e| e.to_string())?;
        LogControl::new(flag, move |filter| {
            handle.reload(filter).map_err(|e| e.to_string())
        })
    }

    /// A control over whatever `reload` applies a filter to; `flag` is the filter in force now.
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

    /// The filter `level` stands for: the flag's target directives and `level` as the default
    /// (`off` alone for OFF); the flag itself for `None`.
    pub fn directives(&self, level: Option<LevelFilter>) -> String {
        match level {
            None => self.flag.clone(),
            Some(LevelFilter::OFF) => "off".to_owned(),
            Some(level) => self
                .targets
                .iter()
                .cloned()
                .chain([level.to_string().to_ascii_lowercase()])
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Sets the control plane's level (`None`: the flag's filter); nothing happens when it is
    /// already in force. A filter that cannot be applied is logged and the previous one stays.
    pub fn set(&self, level: Option<LevelFilter>) {
        let mut current = self.current.lock();
        if *current == level {
            return;
        }
        let directives = self.directives(level);
        let from = self.directives(*current);
        if directives == from {
            *current = level;
            return;
        }
        let filter = match EnvFilter::try_new(&directives) {
            Ok(filter) => filter,
            Err(e) => {
                tracing::error!(filter = %directives, error = %e, "cannot set the log level; keeping the previous one");
                return;
            }
        };
        // Said under the more verbose of the two filters, so that it is seen either way.
        let louder = level.unwrap_or(LevelFilter::TRACE) >= current.unwrap_or(LevelFilter::TRACE);
        let say = || {
            tracing::info!(%from, to = %directives, "log level set from MeshConfig spec.sidecar.logLevel");
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
                tracing::error!(filter = %directives, error = %e, "cannot set the log level; keeping the previous one");
            }
        }
    }

    /// The control plane's level in force (`None`: the flag's filter).
    #[cfg(test)]
    pub fn level(&self) -> Option<LevelFilter> {
        *self.current.lock()
    }
}

// === Sink ===

impl ConfigSink for Sink {
    fn try_apply(&mut self, candidate: &ResourceSet, changed: &'static str) -> Result<(), String> {
        self.store.try_apply(candidate, changed)?;
        self.log.set(self.store.0.config().log_level);
        Ok(())
    }

    fn on_nack(&mut self, current: &ResourceSet) {
        self.store.on_nack(current);
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;
    use fsm_dataplane_proto::{RUNTIME_NAME, type_url, v1};
    use fsm_sidecar_proxy::Store;
    use fsm_sidecar_xds::{AdsMode, AdsState, Outcome};
    use prost::Message;

    use super::*;

    fn control(flag: &str) -> (LogControl, Arc<Mutex<Vec<String>>>) {
        let applied = Arc::new(Mutex::new(Vec::new()));
        let seen = applied.clone();
        let control = LogControl::new(flag, move |filter| {
            seen.lock().push(filter.to_string());
            Ok(())
        })
        .expect("a valid flag");
        (control, applied)
    }

    #[test]
    fn a_level_keeps_the_flags_targets() {
        let (control, applied) = control("fsm_sidecar_xds=debug,info");
        assert_eq!(
            control.directives(Some(LevelFilter::TRACE)),
            "fsm_sidecar_xds=debug,trace"
        );
        control.set(Some(LevelFilter::ERROR));
        control.set(Some(LevelFilter::ERROR));
        control.set(Some(LevelFilter::OFF));
        control.set(None);
        // The flag's own default: nothing to reload.
        control.set(Some(LevelFilter::INFO));
        assert_eq!(control.level(), Some(LevelFilter::INFO));
        let applied = applied.lock().clone();
        assert_eq!(applied.len(), 3, "once per change: {applied:?}");
        assert!(applied[0].contains("fsm_sidecar_xds=debug") && applied[0].ends_with("error"));
        assert_eq!(applied[1], "off");
        assert!(applied[2].contains("fsm_sidecar_xds=debug") && applied[2].ends_with("info"));
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
            control.set(Some(LevelFilter::DEBUG));
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            control.set(Some(LevelFilter::OFF));
            assert!(!tracing::enabled!(tracing::Level::ERROR));
            control.set(None);
            assert!(tracing::enabled!(tracing::Level::INFO));
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
        });
    }

    fn runtime_response(version: &str, log_level: i32) -> DiscoveryResponse {
        let runtime = v1::Runtime {
            name: RUNTIME_NAME.into(),
            log_level,
        };
        DiscoveryResponse {
            version_info: version.into(),
            type_url: type_url::RUNTIME.into(),
            nonce: version.into(),
            resources: vec![Any {
                type_url: type_url::RUNTIME.into(),
                value: runtime.encode_to_vec(),
            }],
            ..Default::default()
        }
    }

    /// The Runtime resource goes through the store and its ACK/NACK like any other: a level is
    /// applied once accepted, an unknown one is NACKed and the level in force stays; it does not
    /// make the sidecar ready.
    #[test]
    fn runtime_updates_set_the_level_through_the_store() {
        let (control, _) = control("info");
        let store = Arc::new(Store::default());
        let mut sink = Sink {
            store: StoreSink(store.clone()),
            log: Arc::new(control),
        };
        let mut state = AdsState::new(AdsMode::Sotw, Node::default());
        let (_, outcome) =
            state.on_sotw(runtime_response("1", v1::LogLevel::Debug as i32), &mut sink);
        assert!(matches!(outcome, Outcome::Ack { .. }), "{outcome:?}");
        assert_eq!(sink.log.level(), Some(LevelFilter::DEBUG));
        assert!(
            !store.is_ready(),
            "Runtime alone does not make a sidecar ready"
        );

        let (_, outcome) = state.on_sotw(runtime_response("2", 99), &mut sink);
        assert!(
            matches!(&outcome, Outcome::Nack { error, .. } if error.contains("log_level")),
            "{outcome:?}"
        );
        assert_eq!(sink.log.level(), Some(LevelFilter::DEBUG));

        let (_, outcome) = state.on_sotw(
            runtime_response("3", v1::LogLevel::Unspecified as i32),
            &mut sink,
        );
        assert!(matches!(outcome, Outcome::Ack { .. }), "{outcome:?}");
        assert_eq!(sink.log.level(), None);
    }
}
