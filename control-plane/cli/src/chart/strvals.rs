//! Helm's values: `--set` expressions (Helm's strvals syntax and typing) and the merge of
//! user values over the chart's `values.yaml`.

use anyhow::{Result, bail};
use serde_json::{Map, Value};

/// Helm's typing of a `--set` value: true/false/null (any case), integers without a leading
/// zero, everything else a string (`--set a=1.5` is the string "1.5", as in Helm).
fn typed(text: &str) -> Value {
    if text.eq_ignore_ascii_case("true") {
        return Value::Bool(true);
    }
    if text.eq_ignore_ascii_case("false") {
        return Value::Bool(false);
    }
    if text.eq_ignore_ascii_case("null") {
        return Value::Null;
    }
    if text == "0" {
        return Value::from(0i64);
    }
    if !text.starts_with('0')
        && let Ok(n) = text.parse::<i64>()
    {
        return Value::from(n);
    }
    Value::String(text.to_string())
}

/// Splits at `sep` outside `{…}` and not escaped by `\`, keeping the escapes for the next step.
fn split_unescaped(text: &str, sep: char) -> Vec<String> {
    let (mut parts, mut current, mut depth, mut escaped) = (Vec::new(), String::new(), 0u32, false);
    for c in text.chars() {
        if escaped {
            current.push('\\');
            current.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '{' => {
                depth += 1;
                current.push(c);
            }
            '}' => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            c if c == sep && depth == 0 => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    if escaped {
        current.push('\\');
    }
    parts.push(current);
    parts
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One step of a key path: a map key or a list index (`a.b[0].c`).
#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn key_path(key: &str, whole: &str) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for segment in split_unescaped(key, '.') {
        // `name[1][2]`: the name, then its indexes.
        let (name, mut rest) = match segment.find('[') {
            Some(i) if !segment[..i].ends_with('\\') => (&segment[..i], &segment[i..]),
            _ => (segment.as_str(), ""),
        };
        if name.is_empty() {
            bail!("--set {whole}: key {key:?} has an empty part");
        }
        steps.push(Step::Key(unescape(name)));
        while !rest.is_empty() {
            let Some(close) = rest.find(']') else {
                bail!("--set {whole}: key {key:?} has an unclosed [");
            };
            let index: usize = rest[1..close].parse().map_err(|_| {
                anyhow::anyhow!("--set {whole}: {:?} is not a list index", &rest[1..close])
            })?;
            if index > 65_536 {
                bail!("--set {whole}: index {index} is larger than 65536 (Helm's limit)");
            }
            steps.push(Step::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                bail!("--set {whole}: unexpected {rest:?} after an index in key {key:?}");
            }
        }
    }
    Ok(steps)
}

fn set_at(target: &mut Value, steps: &[Step], value: Value) {
    let Some((step, rest)) = steps.split_first() else {
        *target = value;
        return;
    };
    match step {
        Step::Key(key) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let map = target.as_object_mut().expect("made an object above");
            set_at(map.entry(key.clone()).or_insert(Value::Null), rest, value);
        }
        Step::Index(index) => {
            if !target.is_array() {
                *target = Value::Array(Vec::new());
            }
            let list = target.as_array_mut().expect("made an array above");
            if list.len() <= *index {
                list.resize(index + 1, Value::Null);
            }
            set_at(&mut list[*index], rest, value);
        }
    }
}

/// Applies one `--set` argument (`a.b=c,d[0]=e,f={x,y}`) to `values`.
pub fn apply_set(values: &mut Value, expression: &str) -> Result<()> {
    for assignment in split_unescaped(expression, ',') {
        if assignment.is_empty() {
            continue;
        }
        let parts = split_unescaped(&assignment, '=');
        if parts.len() < 2 {
            bail!(
                "--set {expression}: key {:?} has no value (expected key=value)",
                unescape(&assignment)
            );
        }
        let key = &parts[0];
        // Everything after the first unescaped '=' is the value.
        let raw = parts[1..].join("=");
        let value = match raw.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
            Some("") => Value::Array(Vec::new()),
            Some(items) => Value::Array(
                split_unescaped(items, ',')
                    .iter()
                    .map(|item| typed(&unescape(item)))
                    .collect(),
            ),
            None => typed(&unescape(&raw)),
        };
        set_at(values, &key_path(key, expression)?, value);
    }
    Ok(())
}

/// `overrides` merged over `defaults` as Helm coalesces values: maps merge key by key and
/// anything else replaces. A null override deletes the key when coalescing over the chart's
/// defaults (`delete_nulls`), and is kept while the user's own values are gathered.
pub fn merge(defaults: &mut Value, overrides: Value, delete_nulls: bool) {
    match (defaults, overrides) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                if value.is_null() && delete_nulls {
                    base.remove(&key);
                } else if let Some(existing) = base.get_mut(&key) {
                    merge(existing, value, delete_nulls);
                } else {
                    base.insert(key, value);
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(expressions: &[&str]) -> Value {
        let mut values = json!({});
        for e in expressions {
            apply_set(&mut values, e).expect("must succeed");
        }
        values
    }

    #[test]
    fn types_values_like_helm() {
        assert_eq!(
            set(&["a=true,b=FALSE,c=null,d=0,e=42,f=042,g=1.5,h=-3,i=text"]),
            json!({"a": true, "b": false, "c": null, "d": 0, "e": 42, "f": "042", "g": "1.5", "h": -3, "i": "text"})
        );
    }

    #[test]
    fn nests_keys_indexes_and_lists() {
        assert_eq!(
            set(&[
                "fsm.image.tag=v1",
                "fsm.list[1].name=x",
                "fsm.ports={6379,7070}",
                "e={}"
            ]),
            json!({"fsm": {"image": {"tag": "v1"}, "list": [null, {"name": "x"}], "ports": [6379, 7070]}, "e": []})
        );
    }

    #[test]
    fn escapes_commas_dots_and_equals() {
        assert_eq!(
            set(&[r"a\.b=x\,y,c=d=e"]),
            json!({"a.b": "x,y", "c": "d=e"})
        );
    }

    #[test]
    fn refuses_what_helm_refuses() {
        let mut v = json!({});
        for bad in ["novalue", "a[x]=1", "a[1=2", "a..b=1", "a[99999999]=1"] {
            assert!(apply_set(&mut v, bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn merges_over_defaults_and_null_deletes() {
        let mut base = json!({"fsm": {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}});
        let user = json!({"fsm": {"b": {"c": 9, "d": null}, "e": [5], "new": "x"}});
        let mut kept = json!({});
        merge(&mut kept, user.clone(), false);
        assert_eq!(kept, user, "the user's values keep their nulls");
        merge(&mut base, user, true);
        assert_eq!(
            base,
            json!({"fsm": {"a": 1, "b": {"c": 9}, "e": [5], "new": "x"}})
        );
    }
}
