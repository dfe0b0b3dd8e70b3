//! Embeds charts/fsm in the `fsm` binary, as FSM's CLI embeds its chart: `fsm install` renders
//! the chart of its own version, with no chart repository and no Helm binary.
//!
//! A generated list of `include_str!`s rather than a directory-embedding macro: `include_str!`
//! makes cargo rebuild when a chart file changes, and `rerun-if-changed` on the directory catches
//! files added or removed.

use std::path::{Path, PathBuf};
use std::{env, fs};

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let chart = manifest_dir.join("../../charts/fsm").canonicalize()?;
    println!("cargo:rerun-if-changed={}", chart.display());
    let mut paths = Vec::new();
    files(&chart, &mut paths)?;
    paths.sort();
    let mut code = String::from(
        "/// charts/fsm: (path in the chart, contents).\npub static CHART_FILES: &[(&str, &str)] = &[\n",
    );
    for path in &paths {
        let relative = path.strip_prefix(&chart).expect("under the chart");
        let relative = relative
            .to_str()
            .expect("chart paths are UTF-8")
            .replace('\\', "/");
        code.push_str(&format!(
            "    ({relative:?}, include_str!({:?})),\n",
            path.to_str().expect("chart paths are UTF-8")
        ));
    }
    code.push_str("];\n");
    fs::write(
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets it")).join("chart_files.rs"),
        code,
    )
}
