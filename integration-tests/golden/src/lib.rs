//! Golden-file test runner: testdata/<case>/in.yaml against out.*.yaml, with UPDATE_GOLDEN=1 and
//! an orphan check.
//!
//! Every case is a folder holding `in.yaml`. The function under test turns it into named outputs
//! (`out.<what>.<ext>`) or an error, which is compared with `expect-error.txt`. A normal run fails
//! on any difference, on a missing output and on an orphan `out.*` file nobody produces any more;
//! `UPDATE_GOLDEN=1` rewrites the outputs and deletes stale ones, to be reviewed in the diff.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

const EXPECT_ERROR: &str = "expect-error.txt";

/// Runs `render` on every case under `testdata` and panics with every mismatch found.
pub fn run(testdata: &Path, render: impl Fn(&str) -> Result<BTreeMap<String, String>, String>) {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    let cases = cases(testdata);
    assert!(
        !cases.is_empty(),
        "no golden cases under {}",
        testdata.display()
    );
    for case in cases {
        let input = match fs::read_to_string(case.join("in.yaml")) {
            Ok(text) => text,
            Err(err) => {
                failures.push(format!("{}: cannot read in.yaml: {err}", case.display()));
                continue;
            }
        };
        let mut expected_files: BTreeMap<String, String> = match render(&input) {
            Ok(outputs) => outputs,
            Err(error) => {
                BTreeMap::from([(EXPECT_ERROR.to_string(), format!("{}\n", error.trim_end()))])
            }
        };
        for name in expected_files.keys() {
            assert!(
                name == EXPECT_ERROR || name.starts_with("out."),
                "output name {name} must start with out."
            );
        }
        let existing = existing_outputs(&case);
        if update {
            for stale in existing.iter().filter(|n| !expected_files.contains_key(*n)) {
                if let Err(err) = fs::remove_file(case.join(stale)) {
                    failures.push(format!("{}: cannot delete {stale}: {err}", case.display()));
                }
            }
            for (name, content) in &expected_files {
                if let Err(err) = fs::write(case.join(name), content) {
                    failures.push(format!("{}: cannot write {name}: {err}", case.display()));
                }
            }
            continue;
        }
        for orphan in existing.iter().filter(|n| !expected_files.contains_key(*n)) {
            failures.push(format!(
                "{}: orphan {orphan} is no longer produced (run with UPDATE_GOLDEN=1)",
                case.display()
            ));
        }
        for (name, actual) in std::mem::take(&mut expected_files) {
            match fs::read_to_string(case.join(&name)) {
                Ok(golden) if golden == actual => {}
                Ok(golden) => failures.push(format!(
                    "{}: {name} differs (run with UPDATE_GOLDEN=1 and review the diff)\n{}",
                    case.display(),
                    first_difference(&golden, &actual)
                )),
                Err(_) => failures.push(format!(
                    "{}: {name} is missing (run with UPDATE_GOLDEN=1)",
                    case.display()
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}

fn cases(testdata: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(testdata)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("in.yaml").is_file())
                .collect()
        })
        .unwrap_or_default();
    cases.sort();
    cases
}

fn existing_outputs(case: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(case)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n == EXPECT_ERROR || n.starts_with("out."))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn first_difference(golden: &str, actual: &str) -> String {
    let mut golden_lines = golden.lines();
    let mut actual_lines = actual.lines();
    let mut line = 1;
    loop {
        match (golden_lines.next(), actual_lines.next()) {
            (Some(g), Some(a)) if g == a => line += 1,
            (None, None) => return "  (only line endings differ)".to_string(),
            (g, a) => {
                return format!(
                    "  line {line}:\n  - golden: {}\n  + actual: {}",
                    g.unwrap_or("<end>"),
                    a.unwrap_or("<end>")
                );
            }
        }
    }
}

/// Stand-in mTLS material for adapter golden cases: adapters copy PEM text without parsing it,
/// so recognisable placeholders keep the golden files readable and free of real keys.
pub fn placeholder_credentials() -> fsm_ir::ProxyCredentials {
    fsm_ir::ProxyCredentials {
        cert_chain_pem:
            "-----BEGIN CERTIFICATE-----\nservice certificate\n-----END CERTIFICATE-----\n".into(),
        private_key_pem: "-----BEGIN PRIVATE KEY-----\nservice key\n-----END PRIVATE KEY-----\n"
            .into(),
        trust_bundle_pem: "-----BEGIN CERTIFICATE-----\nmesh root\n-----END CERTIFICATE-----\n"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_orphans_and_differences_and_updates() {
        let dir = std::env::temp_dir().join(format!("fsm-golden-{}", std::process::id()));
        let case = dir.join("case");
        fs::create_dir_all(&case).expect("mkdir");
        fs::write(case.join("in.yaml"), "x").expect("write");
        fs::write(case.join("out.a.yaml"), "old\n").expect("write");
        fs::write(case.join("out.orphan.yaml"), "o\n").expect("write");
        let render = |input: &str| {
            Ok(BTreeMap::from([(
                "out.a.yaml".to_string(),
                format!("{input}\n"),
            )]))
        };
        let result = std::panic::catch_unwind(|| run(&dir, render));
        let message = *result
            .expect_err("must fail")
            .downcast::<String>()
            .expect("string panic");
        assert!(message.contains("orphan out.orphan.yaml"), "{message}");
        assert!(message.contains("out.a.yaml differs"), "{message}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
