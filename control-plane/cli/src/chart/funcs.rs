//! The Helm template functions (Helm's own and Sprig's) that charts/fsm uses, and the common
//! ones next to them, with Sprig's semantics (emptiness, Go's `%q` and `%v`, kinds).
//! `include` is added by the renderer, which owns the template set it calls into.

use std::sync::Arc;

use base64::Engine;
use gotmpl::{FuncMap, TemplateError, Value};

type FuncResult = gotmpl::Result<Value>;

fn error(message: impl Into<String>) -> TemplateError {
    TemplateError::Exec(message.into())
}

fn arg<'a>(args: &'a [Value], i: usize, func: &str) -> gotmpl::Result<&'a Value> {
    args.get(i)
        .ok_or_else(|| error(format!("{func}: missing argument {}", i + 1)))
}

/// Go's `%v` of a float64: the shortest representation, exponent form from 1e21 (as `1e+21`).
fn go_float(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e21 {
        return format!("{f:.0}");
    }
    let text = format!("{f:e}");
    match text.split_once('e') {
        Some((mantissa, exp)) if (f.abs() >= 1e21 || f.abs() < 1e-4) && f != 0.0 => {
            let exp: i32 = exp.parse().unwrap_or(0);
            format!(
                "{mantissa}e{}{:02}",
                if exp < 0 { '-' } else { '+' },
                exp.abs()
            )
        }
        _ => format!("{f}"),
    }
}

/// Sprig's `strval`/`toString`: Go's `%v`, with nil as `<nil>`.
pub fn to_string(v: &Value) -> String {
    match v {
        Value::Float(f) => go_float(*f),
        Value::List(items) => {
            let items: Vec<String> = items.iter().map(to_string).collect();
            format!("[{}]", items.join(" "))
        }
        other => other.to_string(),
    }
}

/// Go's `%q`: a double-quoted string with Go's escapes.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Sprig's emptiness: nil, false, 0, "", and empty lists and maps.
pub fn is_empty(v: &Value) -> bool {
    match v {
        Value::Nil => true,
        Value::Bool(b) => !b,
        Value::Int(n) => *n == 0,
        Value::Uint(n) => *n == 0,
        Value::Float(f) => *f == 0.0,
        Value::String(s) => s.is_empty(),
        Value::List(l) => l.is_empty(),
        Value::Map(m) => m.is_empty(),
        _ => false,
    }
}

/// Go's reflect kind names, as `kindIs` compares them.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "invalid",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int64",
        Value::Uint(_) => "uint64",
        Value::Float(_) => "float64",
        Value::String(_) => "string",
        Value::List(_) => "slice",
        Value::Map(_) => "map",
        _ => "func",
    }
}

/// spf13/cast's ToInt64, as Sprig's `int`/`int64`: unparseable text is 0.
fn to_int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::Uint(n) => i64::try_from(*n).unwrap_or(i64::MAX),
        Value::Float(f) => *f as i64,
        Value::Bool(b) => i64::from(*b),
        Value::String(s) => {
            let s = s.trim();
            let (negative, digits) = match s.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, s.strip_prefix('+').unwrap_or(s)),
            };
            let parsed = if let Some(hex) = digits.strip_prefix("0x").or(digits.strip_prefix("0X"))
            {
                i64::from_str_radix(hex, 16).ok()
            } else if let Some(bin) = digits.strip_prefix("0b") {
                i64::from_str_radix(bin, 2).ok()
            } else if digits.len() > 1 && digits.starts_with('0') {
                i64::from_str_radix(digits.trim_start_matches("0o"), 8).ok()
            } else {
                digits.parse().ok()
            };
            parsed.map_or(0, |n| if negative { -n } else { n })
        }
        _ => 0,
    }
}

fn indent(spaces: &Value, text: &Value) -> String {
    let pad = " ".repeat(usize::try_from(to_int(spaces)).unwrap_or(0));
    format!(
        "{pad}{}",
        to_string(text).replace('\n', &format!("\n{pad}"))
    )
}

fn items(v: &Value) -> Vec<Value> {
    match v {
        Value::List(l) => l.to_vec(),
        Value::Nil => Vec::new(),
        other => vec![other.clone()],
    }
}

fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Nil => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(n) => (*n).into(),
        Value::Uint(n) => (*n).into(),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        Value::String(s) => s.to_string().into(),
        Value::List(l) => l.iter().map(to_json).collect(),
        Value::Map(m) => m.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect(),
        other => other.to_string().into(),
    }
}

/// The function map; `include` comes from the renderer.
pub fn funcs() -> FuncMap {
    let mut f = FuncMap::new();
    let mut add = |name: &str, func: fn(&[Value]) -> FuncResult| {
        f.insert(name.to_string(), Arc::new(func));
    };
    add("fail", |a| Err(error(to_string(arg(a, 0, "fail")?))));
    add("required", |a| {
        let value = arg(a, 1, "required")?;
        match value {
            Value::Nil => Err(error(to_string(&a[0]))),
            Value::String(s) if s.is_empty() => Err(error(to_string(&a[0]))),
            v => Ok(v.clone()),
        }
    });
    add("default", |a| {
        let fallback = arg(a, 0, "default")?;
        Ok(match a.get(1) {
            Some(v) if !is_empty(v) => v.clone(),
            _ => fallback.clone(),
        })
    });
    add("empty", |a| Ok(Value::Bool(a.first().is_none_or(is_empty))));
    add("coalesce", |a| {
        Ok(a.iter()
            .find(|v| !is_empty(v))
            .cloned()
            .unwrap_or(Value::Nil))
    });
    add("ternary", |a| {
        Ok(if arg(a, 2, "ternary")?.is_truthy() {
            a[0].clone()
        } else {
            a[1].clone()
        })
    });
    add("quote", |a| {
        let quoted: Vec<String> = a
            .iter()
            .filter(|v| !matches!(v, Value::Nil))
            .map(|v| go_quote(&to_string(v)))
            .collect();
        Ok(Value::String(quoted.join(" ").into()))
    });
    add("squote", |a| {
        let quoted: Vec<String> = a
            .iter()
            .filter(|v| !matches!(v, Value::Nil))
            .map(|v| format!("'{}'", to_string(v)))
            .collect();
        Ok(Value::String(quoted.join(" ").into()))
    });
    add("toString", |a| {
        Ok(Value::String(to_string(arg(a, 0, "toString")?).into()))
    });
    add("int", |a| Ok(Value::Int(to_int(arg(a, 0, "int")?))));
    add("int64", |a| Ok(Value::Int(to_int(arg(a, 0, "int64")?))));
    add("indent", |a| {
        Ok(Value::String(
            indent(arg(a, 0, "indent")?, arg(a, 1, "indent")?).into(),
        ))
    });
    add("nindent", |a| {
        Ok(Value::String(
            format!("\n{}", indent(arg(a, 0, "nindent")?, arg(a, 1, "nindent")?)).into(),
        ))
    });
    add("trim", |a| {
        Ok(Value::String(to_string(arg(a, 0, "trim")?).trim().into()))
    });
    add("trimSuffix", |a| {
        let (suffix, s) = (
            to_string(arg(a, 0, "trimSuffix")?),
            to_string(arg(a, 1, "trimSuffix")?),
        );
        Ok(Value::String(
            s.strip_suffix(suffix.as_str()).unwrap_or(&s).into(),
        ))
    });
    add("trimPrefix", |a| {
        let (prefix, s) = (
            to_string(arg(a, 0, "trimPrefix")?),
            to_string(arg(a, 1, "trimPrefix")?),
        );
        Ok(Value::String(
            s.strip_prefix(prefix.as_str()).unwrap_or(&s).into(),
        ))
    });
    add("upper", |a| {
        Ok(Value::String(
            to_string(arg(a, 0, "upper")?).to_uppercase().into(),
        ))
    });
    add("lower", |a| {
        Ok(Value::String(
            to_string(arg(a, 0, "lower")?).to_lowercase().into(),
        ))
    });
    add("replace", |a| {
        let (old, new, s) = (
            to_string(arg(a, 0, "replace")?),
            to_string(arg(a, 1, "replace")?),
            to_string(arg(a, 2, "replace")?),
        );
        Ok(Value::String(s.replace(&old, &new).into()))
    });
    add("contains", |a| {
        Ok(Value::Bool(
            to_string(arg(a, 1, "contains")?).contains(&to_string(&a[0])),
        ))
    });
    add("hasPrefix", |a| {
        Ok(Value::Bool(
            to_string(arg(a, 1, "hasPrefix")?).starts_with(&to_string(&a[0])),
        ))
    });
    add("hasSuffix", |a| {
        Ok(Value::Bool(
            to_string(arg(a, 1, "hasSuffix")?).ends_with(&to_string(&a[0])),
        ))
    });
    add("list", |a| Ok(Value::List(a.to_vec().into())));
    add("has", |a| {
        Ok(Value::Bool(items(arg(a, 1, "has")?).contains(&a[0])))
    });
    add("splitList", |a| {
        let (sep, s) = (
            to_string(arg(a, 0, "splitList")?),
            to_string(arg(a, 1, "splitList")?),
        );
        Ok(Value::List(
            s.split(sep.as_str())
                .map(|p| Value::String(p.into()))
                .collect::<Vec<_>>()
                .into(),
        ))
    });
    add("join", |a| {
        let sep = to_string(arg(a, 0, "join")?);
        let parts: Vec<String> = items(arg(a, 1, "join")?).iter().map(to_string).collect();
        Ok(Value::String(parts.join(&sep).into()))
    });
    add("regexMatch", |a| {
        let (pattern, s) = (
            to_string(arg(a, 0, "regexMatch")?),
            to_string(arg(a, 1, "regexMatch")?),
        );
        // Sprig's regexMatch is false for a pattern that does not compile (mustRegexMatch errs).
        Ok(Value::Bool(
            regex::Regex::new(&pattern).is_ok_and(|re| re.is_match(&s)),
        ))
    });
    add("kindIs", |a| {
        Ok(Value::Bool(
            to_string(arg(a, 0, "kindIs")?) == kind(arg(a, 1, "kindIs")?),
        ))
    });
    add("kindOf", |a| {
        Ok(Value::String(kind(arg(a, 0, "kindOf")?).into()))
    });
    add("dict", |a| {
        let mut map = std::collections::BTreeMap::new();
        for pair in a.chunks(2) {
            map.insert(
                to_string(&pair[0]),
                pair.get(1).cloned().unwrap_or(Value::Nil),
            );
        }
        Ok(Value::from(map))
    });
    add("get", |a| {
        let key = to_string(arg(a, 1, "get")?);
        Ok(match &a[0] {
            Value::Map(m) => m
                .get(key.as_str())
                .cloned()
                .unwrap_or(Value::String("".into())),
            _ => Value::String("".into()),
        })
    });
    add("hasKey", |a| {
        let key = to_string(arg(a, 1, "hasKey")?);
        Ok(Value::Bool(
            matches!(&a[0], Value::Map(m) if m.contains_key(key.as_str())),
        ))
    });
    add("toYaml", |a| {
        // Helm's toYaml: sigs.k8s.io/yaml with the final newline trimmed; "" when it cannot encode.
        let text = serde_yaml_ng::to_string(&to_json(arg(a, 0, "toYaml")?)).unwrap_or_default();
        Ok(Value::String(text.trim_end_matches('\n').into()))
    });
    add("toJson", |a| {
        Ok(Value::String(
            serde_json::to_string(&to_json(arg(a, 0, "toJson")?))
                .unwrap_or_default()
                .into(),
        ))
    });
    add("b64enc", |a| {
        Ok(Value::String(
            base64::engine::general_purpose::STANDARD
                .encode(to_string(arg(a, 0, "b64enc")?))
                .into(),
        ))
    });
    add("b64dec", |a| {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(to_string(arg(a, 0, "b64dec")?))
            .map_err(|e| error(format!("b64dec: {e}")))?;
        Ok(Value::String(
            String::from_utf8_lossy(&decoded).into_owned().into(),
        ))
    });
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &[Value]) -> FuncResult {
        funcs()[name](args)
    }
    fn s(text: &str) -> Value {
        Value::String(text.into())
    }

    #[test]
    fn sprig_semantics() {
        assert_eq!(
            call("default", &[s("d"), s("")]).expect("must succeed"),
            s("d")
        );
        assert_eq!(
            call("default", &[s("d"), Value::Int(0)]).expect("must succeed"),
            s("d")
        );
        assert_eq!(
            call("default", &[s("d"), s("v")]).expect("must succeed"),
            s("v")
        );
        assert_eq!(
            call("quote", &[s("a\"b\n")]).expect("must succeed"),
            s("\"a\\\"b\\n\"")
        );
        assert_eq!(
            call("quote", &[Value::Int(7)]).expect("must succeed"),
            s("\"7\"")
        );
        assert_eq!(
            call("toString", &[Value::Float(9091.0)]).expect("must succeed"),
            s("9091")
        );
        assert_eq!(
            call("toString", &[Value::Float(1e21)]).expect("must succeed"),
            s("1e+21")
        );
        assert_eq!(
            call("toString", &[Value::Float(0.5)]).expect("must succeed"),
            s("0.5")
        );
        assert_eq!(
            call("int", &[s("12")]).expect("must succeed"),
            Value::Int(12)
        );
        assert_eq!(call("int", &[s("x")]).expect("must succeed"), Value::Int(0));
        assert_eq!(
            call("int", &[Value::Float(3.9)]).expect("must succeed"),
            Value::Int(3)
        );
        assert_eq!(
            call("nindent", &[Value::Int(2), s("a\nb")]).expect("must succeed"),
            s("\n  a\n  b")
        );
        assert_eq!(
            call("kindIs", &[s("bool"), Value::Bool(true)]).expect("must succeed"),
            Value::Bool(true)
        );
        assert_eq!(
            call("kindIs", &[s("bool"), s("true")]).expect("must succeed"),
            Value::Bool(false)
        );
        assert_eq!(
            call("regexMatch", &[s("^[0-9]+$"), s("12")]).expect("must succeed"),
            Value::Bool(true)
        );
        assert_eq!(
            call("regexMatch", &[s("("), s("12")]).expect("must succeed"),
            Value::Bool(false)
        );
        assert_eq!(
            call(
                "has",
                &[
                    s("b"),
                    call("list", &[s("a"), s("b")]).expect("must succeed")
                ]
            )
            .expect("must succeed"),
            Value::Bool(true)
        );
        assert_eq!(
            call(
                "join",
                &[
                    s(", "),
                    call("splitList", &[s(" "), s("a b")]).expect("must succeed")
                ]
            )
            .expect("must succeed"),
            s("a, b")
        );
        assert_eq!(
            call("b64enc", &[s("token")]).expect("must succeed"),
            s("dG9rZW4=")
        );
        assert!(call("fail", &[s("no")]).is_err_and(|e| e.to_string().contains("no")));
        assert!(call("required", &[s("need x"), Value::Nil]).is_err());
    }

    #[test]
    fn to_yaml_is_helms_form() {
        let value = gotmpl::to_value(&serde_json::json!({"b": [1, 2], "a": {"x": "y"}}))
            .expect("must succeed");
        assert_eq!(
            call("toYaml", &[value]).expect("must succeed"),
            s("a:\n  x: y\nb:\n- 1\n- 2")
        );
    }
}
