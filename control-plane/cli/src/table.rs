//! Tables as kubectl prints them: left-aligned columns separated by at least two spaces.

/// `rows` (the first is the header) as aligned columns.
pub fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align_under_the_widest_cell() {
        let rows = vec![
            vec!["NAMESPACE".to_string(), "MESH".to_string()],
            vec!["demo".to_string(), "fsm".to_string()],
        ];
        assert_eq!(super::columns(&rows), "NAMESPACE  MESH\ndemo       fsm\n");
    }
}
