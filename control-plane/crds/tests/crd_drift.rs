//! The committed `charts/fsm/crds/*.yaml` must be exactly what the types generate.

use fsm_crds::crdgen::{self, REGENERATE_COMMAND};

#[test]
fn committed_crds_match_the_types() {
    let dir = crdgen::default_out_dir();
    let drift = crdgen::check_dir(&dir).expect("read charts/fsm/crds");
    let listing: Vec<String> = drift.iter().map(|d| format!("  {d}")).collect();
    assert!(
        drift.is_empty(),
        "{} is out of date with the fsm-crds types:\n{}\nregenerate with `{REGENERATE_COMMAND}` and commit the result",
        dir.display(),
        listing.join("\n"),
    );
}
