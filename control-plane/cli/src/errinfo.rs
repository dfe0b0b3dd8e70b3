//! `fsm support error-info [code]`: FSM's error-code table, in FSM's ASCII grid (header
//! `ERROR CODE | DESCRIPTION`, descriptions word-wrapped: at 80 columns for the whole table, at 63
//! for one code).

use fsm_errcode::ErrCode;

/// Description column widths FSM uses.
const WIDTH_ALL: usize = 80;
const WIDTH_ONE: usize = 63;
const CODE_WIDTH: usize = "ERROR CODE".len();

/// The whole table, or the row of `code`; an unknown code is an error naming it.
pub fn error_info(code: Option<&str>) -> Result<String, String> {
    match code {
        None => Ok(table(ErrCode::ALL, WIDTH_ALL)),
        Some(text) => {
            let wanted = text.trim().to_ascii_uppercase();
            let code = ErrCode::ALL
                .iter()
                .find(|c| c.as_str() == wanted)
                .ok_or_else(|| {
                    format!(
                        "Error code {text:?} is not a valid FSM error code; run `fsm support error-info` for the list"
                    )
                })?;
            Ok(table(std::slice::from_ref(code), WIDTH_ONE))
        }
    }
}

fn table(codes: &[ErrCode], width: usize) -> String {
    let rule = format!(
        "+{}+{}+\n",
        "-".repeat(CODE_WIDTH + 2),
        "-".repeat(width + 2)
    );
    let mut out = rule.clone();
    out.push_str(&row("ERROR CODE", "DESCRIPTION", width));
    out.push_str(&rule);
    for code in codes {
        let lines = wrap(code.description(), wrap_at(width));
        for (i, line) in lines.iter().enumerate() {
            let left = if i == 0 { code.as_str() } else { "" };
            out.push_str(&row(left, line, width));
        }
        out.push_str(&rule);
    }
    out
}

/// Where FSM's descriptions wrap: the whole table fills its 80 columns, the one-code view stops
/// a column short of its 63 (its E1000 row, 63 characters, wraps).
fn wrap_at(width: usize) -> usize {
    if width == WIDTH_ONE { width - 1 } else { width }
}

fn row(left: &str, right: &str, width: usize) -> String {
    format!("| {left:<CODE_WIDTH$} | {right:<width$} |\n")
}

/// Greedy word wrap at `width` columns; a word longer than the width gets a line of its own.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_code_is_fsms_grid() {
        let expected = "\
+------------+-----------------------------------------------------------------+
| ERROR CODE | DESCRIPTION                                                     |
+------------+-----------------------------------------------------------------+
| E1000      | An invalid command line argument was passed to the              |
|            | application.                                                    |
+------------+-----------------------------------------------------------------+
";
        assert_eq!(error_info(Some("E1000")).expect("known"), expected);
        assert_eq!(error_info(Some("e1000")).expect("any case"), expected);
    }

    #[test]
    fn the_whole_table_wraps_at_80_like_fsms() {
        let all = error_info(None).expect("table");
        // Rows of FSM's own output (seed lines 5916-5940).
        for line in [
            "| E1000      | An invalid command line argument was passed to the application.                  |",
            "| E1004      | The Ingress client created by the fsm-controller to monitor Ingress resources    |",
            "|            | failed to start.                                                                 |",
            "| E2000      | An error was encountered while attempting to deduplicate traffic matching        |",
            "|            | attributes (destination port, protocol, IP address etc.) used for matching       |",
        ] {
            assert!(all.contains(line), "missing {line:?}");
        }
        let rows = all
            .lines()
            .filter(|l| l.starts_with("| E") && !l.starts_with("| ERROR"))
            .count();
        assert_eq!(rows, ErrCode::ALL.len());
        assert!(
            all.lines()
                .all(|l| l.chars().count() == all.lines().next().map_or(0, |f| f.chars().count()))
        );
    }

    /// Every `E` + four digits the code base writes (an `ErrCode` variant, or a code inside a
    /// message or a test's expectation), which `fsm support error-info` must be able to explain.
    #[test]
    fn every_code_the_code_base_emits_is_in_the_table() {
        fn walk(dir: &std::path::Path, found: &mut std::collections::BTreeMap<String, String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    if !matches!(name.as_str(), "target" | ".git" | ".venv" | "node_modules")
                        && !name.starts_with('.')
                    {
                        walk(&path, found);
                    }
                } else if name.ends_with(".rs") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let bytes = text.as_bytes();
                    for (i, _) in text.match_indices('E') {
                        let code = bytes.get(i..i + 5);
                        let before = i.checked_sub(1).and_then(|j| bytes.get(j));
                        let after = bytes.get(i + 5);
                        let word = |b: Option<&u8>| {
                            b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
                        };
                        if let Some(code) = code
                            && code[1..].iter().all(u8::is_ascii_digit)
                            && (b'1'..=b'7').contains(&code[1])
                            && !word(before)
                            && !word(after)
                        {
                            found
                                .entry(String::from_utf8_lossy(code).into_owned())
                                .or_insert_with(|| path.display().to_string());
                        }
                    }
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut found = std::collections::BTreeMap::new();
        for dir in [
            "control-plane",
            "adapters",
            "cert-manager",
            "dataplane-rs",
            "integration-tests",
        ] {
            walk(&root.join(dir), &mut found);
        }
        assert!(found.len() > 30, "found only {found:?}");
        let unknown: Vec<_> = found
            .iter()
            .filter(|(code, _)| !ErrCode::ALL.iter().any(|c| c.as_str() == code.as_str()))
            .collect();
        assert!(unknown.is_empty(), "codes with no description: {unknown:?}");
    }

    #[test]
    fn an_unknown_code_is_named() {
        let err = error_info(Some("E9999")).expect_err("unknown");
        assert!(err.contains("\"E9999\""), "{err}");
    }
}
