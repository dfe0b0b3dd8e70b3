//! Every manifest under `examples/` decodes and validates: a README example that the control
//! plane would refuse is a broken promise.

use std::path::{Path, PathBuf};

use fsm_catalog::decode_manifests;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_manifest_decodes_and_validates() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files = Vec::new();
    yaml_files(&examples, &mut files);
    assert!(files.len() >= 10, "found only {files:?}");
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        let (objects, errors) = decode_manifests(&file.display().to_string(), &text);
        problems.extend(errors.iter().map(ToString::to_string));
        if objects.is_empty() {
            problems.push(format!("{}: no objects", file.display()));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
