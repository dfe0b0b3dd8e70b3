//! Every warning and error the control plane logs carries its FSM code and moves
//! `fsm_error_err_code_count`: the code of `control-plane/*` and `cert-manager/` logs them only
//! through `fsm_errcode::warn!`/`error!` (which do both), never with `tracing`'s own macros, and
//! writes no `err_code` field by hand (it would not be counted).
//!
//! Beside `fsm support error-info`'s test that every code the code base writes is in the table
//! (`control-plane/cli/src/errinfo.rs`).

use std::path::{Path, PathBuf};

/// The crates whose logs are the control plane's.
const ROOTS: [&str; 2] = ["control-plane", "cert-manager"];

#[test]
fn every_warning_and_error_is_logged_with_its_code() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for root in ROOTS {
        sources(&repo.join(root), &mut files);
    }
    assert!(files.len() > 50, "found only {} source files", files.len());
    let mut coded = 0;
    let mut problems = Vec::new();
    for file in &files {
        if file.ends_with("control-plane/errcode/src/lib.rs") {
            // The macros themselves.
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable source");
        let shown = file
            .strip_prefix(&repo)
            .unwrap_or(file)
            .display()
            .to_string();
        for (line, problem) in check(&text) {
            problems.push(format!("{shown}:{line}: {problem}"));
        }
        coded += text.matches("fsm_errcode::warn!(").count()
            + text.matches("fsm_errcode::error!(").count();
    }
    assert!(
        problems.is_empty(),
        "log warnings and errors with fsm_errcode::warn!/error!(ErrCode::…, …), which put the code \
         in the err_code field and count it in fsm_error_err_code_count:\n{}",
        problems.join("\n")
    );
    // The scan found the control plane's log sites.
    assert!(coded > 60, "only {coded} coded log sites");
}

#[test]
fn the_scan_catches_what_it_should() {
    let found = |text: &str| check(text).into_iter().map(|(l, _)| l).collect::<Vec<_>>();
    assert_eq!(found("tracing::warn!(%e, \"no\");"), [1]);
    assert_eq!(found("x\n    error!(\"bare\");"), [2]);
    assert_eq!(
        found("tracing::event!(tracing::Level::ERROR, \"x\");"),
        [1],
        "event! at WARN or ERROR"
    );
    assert_eq!(
        found("tracing::info!(err_code = \"E5010\", \"hand-written\");"),
        [1]
    );
    assert_eq!(found("tracing::info!(code = %code, \"old style\");"), [1]);
    assert!(found("let err_code = e.err_code();").is_empty());
    assert!(found("fsm_errcode::warn!(ErrCode::E5010, %e, \"ok\");").is_empty());
    assert!(found("fsm_errcode::error!(\n    ErrCode::E5010,\n    \"ok\"\n);").is_empty());
    assert!(found("tracing::info!(\"fine\"); tracing::debug!(\"fine\");").is_empty());
    assert!(found("// tracing::warn! in a comment").is_empty());
    assert!(
        found("fn f() {}\n#[cfg(test)]\nmod tests {\n    fn g() { tracing::warn!(\"t\"); }\n}\n")
            .is_empty(),
        "test modules are not the control plane's logs"
    );
    assert_eq!(
        found("#[cfg(test)]\nmod tests {\n}\nfn h() { tracing::error!(\"after\"); }"),
        [4]
    );
}

/// `(line, problem)` for each uncoded warning or error, and each hand-written `err_code` field,
/// outside `#[cfg(test)]` modules.
fn check(text: &str) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut skip_depth: Option<i64> = None;
    let mut test_attribute = false;
    for (index, raw) in lines.iter().enumerate() {
        let line = raw.split("//").next().unwrap_or_default();
        if let Some(depth) = skip_depth.as_mut() {
            *depth += braces(line);
            if *depth <= 0 {
                skip_depth = None;
            }
            continue;
        }
        let trimmed = line.trim();
        if trimmed.starts_with("#[cfg(test)]") {
            test_attribute = true;
            continue;
        }
        if test_attribute && (trimmed.starts_with("mod ") || trimmed.starts_with("pub mod ")) {
            test_attribute = false;
            if trimmed.ends_with('{') {
                let depth = braces(line);
                if depth > 0 {
                    skip_depth = Some(depth);
                }
            }
            continue;
        }
        test_attribute = false;
        for level in ["warn!(", "error!("] {
            for (at, _) in line.match_indices(level) {
                let before = &line[..at];
                let prefixed = before.ends_with("fsm_errcode::");
                let part_of_word = before
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_');
                if !prefixed && !part_of_word {
                    problems.push((index + 1, format!("uncoded `{}`", raw.trim())));
                }
            }
        }
        if line.contains("event!(")
            && (line.contains("Level::WARN") || line.contains("Level::ERROR"))
        {
            problems.push((index + 1, format!("uncoded `{}`", raw.trim())));
        }
        let hand_written = ["code = %", "code = ?", "err_code = \"", "err_code="]
            .iter()
            .any(|field| line.contains(field));
        if hand_written {
            problems.push((
                index + 1,
                format!("a hand-written code field is not counted: `{}`", raw.trim()),
            ));
        }
    }
    problems
}

/// Opening minus closing braces on a line (string contents included: format strings balance).
fn braces(line: &str) -> i64 {
    line.chars().fold(0, |n, c| match c {
        '{' => n + 1,
        '}' => n - 1,
        _ => n,
    })
}

/// The `.rs` files under every `src/` below `dir` (crates' own `tests/` are not the control
/// plane's logs).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if path.is_dir() {
            if !matches!(name.as_ref(), "target" | "tests" | "benches" | "testdata")
                && !name.starts_with('.')
            {
                sources(&path, out);
            }
        } else if name.ends_with(".rs") && path.components().any(|c| c.as_os_str() == "src") {
            out.push(path);
        }
    }
}
