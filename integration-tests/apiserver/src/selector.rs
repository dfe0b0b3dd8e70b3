//! Label and field selectors, parsed with the grammar of `k8s.io/apimachinery/pkg/labels` and
//! `pkg/fields`.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::names;
use crate::status::FieldError;

// === Types ===

/// A parsed `labelSelector`. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

/// A parsed `fieldSelector`: a conjunction of `field=value` / `field!=value` terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

#[derive(Debug, Clone, PartialEq)]
struct FieldTerm {
    field: String,
    negated: bool,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Equals,
    DoubleEquals,
    NotEquals,
    Bang,
    Open,
    Close,
    Comma,
    Greater,
    Less,
}

// === LabelSelector ===

impl LabelSelector {
    /// Parses a selector string; the error text follows the real server's
    /// (`unable to parse requirement: …`).
    pub fn parse(input: &str) -> Result<Self, String> {
        Self::parse_inner(input).map_err(|e| {
            if e.starts_with("unable to parse requirement") {
                e
            } else {
                format!("unable to parse requirement: {e}")
            }
        })
    }

    fn parse_inner(input: &str) -> Result<Self, String> {
        let tokens = lex(input);
        let mut parser = Parser { tokens, pos: 0 };
        let mut requirements = Vec::new();
        if parser.peek().is_none() {
            return Ok(LabelSelector { requirements });
        }
        loop {
            requirements.push(parser.requirement()?);
            match parser.next() {
                None => break,
                Some(Token::Comma) => {}
                Some(t) => {
                    return Err(format!(
                        "found '{}', expected: ',' or 'end of string'",
                        t.text()
                    ));
                }
            }
        }
        Ok(LabelSelector { requirements })
    }

    /// Converts a `metav1.LabelSelector` (`matchLabels`, `matchExpressions`), as found in API
    /// objects, checking it like `ValidateLabelSelector` (errors under `path`). An absent
    /// selector (`null`) matches everything.
    pub fn from_k8s(selector: &Value, path: &str) -> Result<Self, Vec<FieldError>> {
        let mut requirements = Vec::new();
        let mut errors = Vec::new();
        if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
            for (key, value) in labels {
                let value = value.as_str().unwrap_or_default();
                for msg in names::qualified_name(key) {
                    errors.push(FieldError::invalid(
                        format!("{path}.matchLabels"),
                        Value::from(key.as_str()),
                        msg,
                    ));
                }
                for msg in names::label_value(value) {
                    errors.push(FieldError::invalid(
                        format!("{path}.matchLabels"),
                        Value::from(value),
                        msg,
                    ));
                }
                requirements.push(Requirement {
                    key: key.clone(),
                    op: Op::Equals,
                    values: vec![value.to_string()],
                });
            }
        }
        let expressions = selector
            .get("matchExpressions")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (i, expr) in expressions.iter().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            let key = expr.get("key").and_then(Value::as_str).unwrap_or_default();
            let operator = expr
                .get("operator")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let values: Vec<String> = expr
                .get("values")
                .and_then(Value::as_array)
                .map(|vs| {
                    vs.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            for msg in names::qualified_name(key) {
                errors.push(FieldError::invalid(
                    format!("{at}.key"),
                    Value::from(key),
                    msg,
                ));
            }
            let op = match operator {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        errors.push(FieldError::required(
                            format!("{at}.values"),
                            "must be specified when `operator` is 'In' or 'NotIn'",
                        ));
                    }
                    if operator == "In" { Op::In } else { Op::NotIn }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        errors.push(FieldError::forbidden(
                            format!("{at}.values"),
                            "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                        ));
                    }
                    if operator == "Exists" {
                        Op::Exists
                    } else {
                        Op::DoesNotExist
                    }
                }
                other => {
                    errors.push(FieldError::invalid(
                        format!("{at}.operator"),
                        Value::from(other),
                        "not a valid selector operator",
                    ));
                    continue;
                }
            };
            requirements.push(Requirement {
                key: key.to_string(),
                op,
                values,
            });
        }
        if errors.is_empty() {
            Ok(LabelSelector { requirements })
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements
            .iter()
            .all(|r| r.matches(|k| labels.get(k).map(String::as_str)))
    }

    /// Matches against `metadata.labels` of a JSON object.
    pub fn matches_object(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        self.requirements
            .iter()
            .all(|r| r.matches(|k| labels.and_then(|l| l.get(k)).and_then(Value::as_str)))
    }
}

impl Requirement {
    fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        let value = get(&self.key);
        match self.op {
            Op::Equals | Op::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Op::NotEquals | Op::NotIn => !value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
            Op::GreaterThan | Op::LessThan => {
                let (Some(v), Some(bound)) = (
                    value.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|b| b.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.op == Op::GreaterThan {
                    v > bound
                } else {
                    v < bound
                }
            }
        }
    }
}

impl Token {
    fn text(&self) -> &str {
        match self {
            Token::Ident(s) => s,
            Token::Equals => "=",
            Token::DoubleEquals => "==",
            Token::NotEquals => "!=",
            Token::Bang => "!",
            Token::Open => "(",
            Token::Close => ")",
            Token::Comma => ",",
            Token::Greater => ">",
            Token::Less => "<",
        }
    }
}

fn lex(input: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | ',' | '>' | '<' => {
                chars.next();
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    ',' => Token::Comma,
                    '>' => Token::Greater,
                    _ => Token::Less,
                });
            }
            '=' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::DoubleEquals);
                } else {
                    tokens.push(Token::Equals);
                }
            }
            '!' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::NotEquals);
                } else {
                    tokens.push(Token::Bang);
                }
            }
            _ => {
                let mut ident = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "(),=!<>".contains(c) {
                        break;
                    }
                    ident.push(c);
                    chars.next();
                }
                tokens.push(Token::Ident(ident));
            }
        }
    }
    tokens
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        let negated = if self.peek() == Some(&Token::Bang) {
            self.pos += 1;
            true
        } else {
            false
        };
        let key = match self.next() {
            Some(Token::Ident(k)) => k,
            Some(t) => return Err(format!("found '{}', expected: identifier", t.text())),
            None => return Err("found '', expected: identifier".to_string()),
        };
        let key_errors = names::qualified_name(&key);
        if !key_errors.is_empty() {
            return Err(format!(
                "unable to parse requirement: key: Invalid value: {key:?}: {}",
                key_errors.join("; ")
            ));
        }
        if negated {
            return Ok(Requirement {
                key,
                op: Op::DoesNotExist,
                values: Vec::new(),
            });
        }
        let op = match self.peek() {
            None | Some(Token::Comma) => {
                return Ok(Requirement {
                    key,
                    op: Op::Exists,
                    values: Vec::new(),
                });
            }
            Some(Token::Equals | Token::DoubleEquals) => Op::Equals,
            Some(Token::NotEquals) => Op::NotEquals,
            Some(Token::Greater) => Op::GreaterThan,
            Some(Token::Less) => Op::LessThan,
            Some(Token::Ident(w)) if w == "in" => Op::In,
            Some(Token::Ident(w)) if w == "notin" => Op::NotIn,
            Some(t) => {
                return Err(format!(
                    "found '{}', expected: in, notin, =, ==, !=, gt, lt",
                    t.text()
                ));
            }
        };
        self.pos += 1;
        let values = match op {
            Op::In | Op::NotIn => self.value_set()?,
            _ => vec![self.single_value()?],
        };
        for v in &values {
            let errs = names::label_value(v);
            if !errs.is_empty() {
                return Err(format!(
                    "unable to parse requirement: values[0][{key}]: Invalid value: {v:?}: {}",
                    errs.join("; ")
                ));
            }
        }
        if matches!(op, Op::GreaterThan | Op::LessThan)
            && values.first().is_none_or(|v| v.parse::<i64>().is_err())
        {
            return Err(format!(
                "unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {:?}",
                values.first().cloned().unwrap_or_default()
            ));
        }
        Ok(Requirement { key, op, values })
    }

    fn single_value(&mut self) -> Result<String, String> {
        match self.peek() {
            // `a=` selects the empty value, as in the real parser.
            None | Some(Token::Comma) => Ok(String::new()),
            Some(Token::Ident(_)) => match self.next() {
                Some(Token::Ident(v)) => Ok(v),
                _ => Ok(String::new()),
            },
            Some(t) => Err(format!("found '{}', expected: identifier", t.text())),
        }
    }

    fn value_set(&mut self) -> Result<Vec<String>, String> {
        match self.next() {
            Some(Token::Open) => {}
            Some(t) => return Err(format!("found '{}', expected: '('", t.text())),
            None => return Err("found '', expected: '('".to_string()),
        }
        let mut values = Vec::new();
        let mut expect_value = true;
        loop {
            match self.next() {
                Some(Token::Close) => {
                    if expect_value {
                        // `in ()` or `in (a,)`: the trailing empty value counts.
                        values.push(String::new());
                    }
                    break;
                }
                Some(Token::Comma) => {
                    if expect_value {
                        values.push(String::new());
                    }
                    expect_value = true;
                }
                Some(Token::Ident(v)) if expect_value => {
                    values.push(v);
                    expect_value = false;
                }
                Some(t) => {
                    return Err(format!(
                        "found '{}', expected: ',', ')' or identifier",
                        t.text()
                    ));
                }
                None => return Err("found '', expected: ')'".to_string()),
            }
        }
        Ok(values)
    }
}

// === FieldSelector ===

impl FieldSelector {
    /// Parses `a=b,c!=d` (with `\,` `\=` `\\` escapes). `supported` says whether the resource
    /// allows a field; the real server rejects unknown ones with a 400.
    pub fn parse(input: &str, supported: impl Fn(&str) -> bool) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in split_unescaped(input, ',') {
            if part.trim().is_empty() {
                continue;
            }
            let (field, negated, value) = if let Some((f, v)) = split_op(&part, "!=") {
                (f, true, v)
            } else if let Some((f, v)) = split_op(&part, "==") {
                (f, false, v)
            } else if let Some((f, v)) = split_op(&part, "=") {
                (f, false, v)
            } else {
                return Err(format!(
                    "invalid selector: '{input}'; can't understand '{part}'"
                ));
            };
            let field = field.trim().to_string();
            if !supported(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push(FieldTerm {
                field,
                negated,
                value: unescape(&value),
            });
        }
        Ok(FieldSelector { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Matches a JSON object: a term's field is read as a dotted path, absent reads as "".
    pub fn matches_object(&self, obj: &Value) -> bool {
        self.terms.iter().all(|t| {
            let actual = field_value(obj, &t.field);
            (actual == t.value) != t.negated
        })
    }

    /// The value of a `metadata.name=x` term, if the selector has one (used to narrow lookups).
    pub fn required_name(&self) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| t.field == "metadata.name" && !t.negated)
            .map(|t| t.value.as_str())
    }
}

/// A dotted field read as the string the real server's field sets hold.
fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if escaped {
        cur.push('\\');
    }
    parts.push(cur);
    parts
}

/// Splits at the first unescaped `op`.
fn split_op(s: &str, op: &str) -> Option<(String, String)> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if s[i..].starts_with(op) {
            return Some((s[..i].to_string(), s[i + op.len()..].to_string()));
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn equality_forms() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(sel("app=web").matches(&l));
        assert!(sel("app==web").matches(&l));
        assert!(sel("app = web , tier=front").matches(&l));
        assert!(!sel("app=db").matches(&l));
        assert!(sel("app!=db").matches(&l));
        assert!(sel("missing!=x").matches(&l));
        assert!(!sel("app!=web").matches(&l));
    }

    #[test]
    fn existence() {
        let l = labels(&[("app", "web")]);
        assert!(sel("app").matches(&l));
        assert!(!sel("!app").matches(&l));
        assert!(sel("!other").matches(&l));
        assert!(!sel("other").matches(&l));
        assert!(sel("").matches(&l));
        assert!(sel("").is_empty());
    }

    #[test]
    fn set_based() {
        let l = labels(&[("env", "prod")]);
        assert!(sel("env in (prod,qa)").matches(&l));
        assert!(sel("env in(prod)").matches(&l));
        assert!(!sel("env in (qa)").matches(&l));
        assert!(sel("env notin (qa)").matches(&l));
        assert!(!sel("env notin (prod, qa)").matches(&l));
        assert!(sel("other notin (x)").matches(&l));
        assert!(!sel("other in (x)").matches(&l));
        assert!(sel("env in (prod),!gone,env").matches(&l));
    }

    #[test]
    fn numeric_comparisons() {
        let l = labels(&[("n", "5")]);
        assert!(sel("n>3").matches(&l));
        assert!(!sel("n<3").matches(&l));
        assert!(LabelSelector::parse("n>x").is_err());
    }

    #[test]
    fn qualified_keys_and_empty_values() {
        let l = labels(&[("flomesh.io/monitored-by", "fsm"), ("e", "")]);
        assert!(sel("flomesh.io/monitored-by=fsm").matches(&l));
        assert!(sel("e=").matches(&l));
        assert!(sel("e in (,x)").matches(&l));
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "=x", "a in x", "a in (x", "a b", "a,,b", "Bad_/x=y", "a=b c", "a=(b)",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should fail");
        }
        assert!(LabelSelector::parse("a=b b").is_err());
        assert!(LabelSelector::parse("a=not valid!").is_err());
    }

    #[test]
    fn matches_json_objects() {
        let obj = json!({"metadata": {"name": "x", "labels": {"app": "web"}}});
        assert!(sel("app=web").matches_object(&obj));
        assert!(!sel("app=db").matches_object(&obj));
        assert!(sel("!app2").matches_object(&json!({"metadata": {"name": "y"}})));
    }

    #[test]
    fn field_selectors() {
        let ok = |f: &str| f == "metadata.name" || f == "metadata.namespace";
        let obj = json!({"metadata": {"name": "a,b", "namespace": "ns"}});
        let s = FieldSelector::parse("metadata.name=a\\,b,metadata.namespace==ns", ok)
            .unwrap_or_default();
        assert!(s.matches_object(&obj));
        assert_eq!(s.required_name(), Some("a,b"));
        let s = FieldSelector::parse("metadata.namespace!=ns", ok).unwrap_or_default();
        assert!(!s.matches_object(&obj));
        assert_eq!(
            FieldSelector::parse("spec.foo=x", ok),
            Err("field label not supported: spec.foo".to_string())
        );
        assert!(FieldSelector::parse("metadata.name", ok).is_err());
        assert!(FieldSelector::parse("", ok).is_ok_and(|s| s.is_empty()));
        // Multi-byte input must not split inside a character.
        let s = FieldSelector::parse("metadata.name=é\\é=x", ok).unwrap_or_default();
        assert!(s.matches_object(&json!({"metadata": {"name": "éé=x"}})));
    }

    #[test]
    fn k8s_label_selectors() {
        let sel = LabelSelector::from_k8s(
            &json!({"matchLabels": {"inject": "yes"},
                    "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]},
                                         {"key": "skip", "operator": "DoesNotExist"}]}),
            "namespaceSelector",
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(sel.matches(&labels(&[("inject", "yes")])));
        assert!(sel.matches(&labels(&[("inject", "yes"), ("tier", "web")])));
        assert!(!sel.matches(&labels(&[("inject", "yes"), ("tier", "db")])));
        assert!(!sel.matches(&labels(&[("inject", "yes"), ("skip", "")])));
        assert!(!sel.matches(&labels(&[])));
        assert!(
            LabelSelector::from_k8s(&Value::Null, "x")
                .is_ok_and(|s| s.is_empty() && s.matches(&labels(&[])))
        );

        let errs = LabelSelector::from_k8s(
            &json!({"matchExpressions": [{"key": "a", "operator": "In"},
                                         {"key": "b", "operator": "Exists", "values": ["x"]},
                                         {"key": "c", "operator": "Near"}]}),
            "objectSelector",
        )
        .err()
        .unwrap_or_default();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "objectSelector.matchExpressions[0].values",
                "objectSelector.matchExpressions[1].values",
                "objectSelector.matchExpressions[2].operator"
            ]
        );
    }
}
