//! Structural OpenAPI v3 schemas of CRDs: pruning, defaulting and validation with the real API
//! server's semantics and error texts (`k8s.io/apiextensions-apiserver` on `kube-openapi`).
//!
//! Order per write, as in the real server: prune unknown fields, apply defaults (dropping
//! non-nullable nulls first), then validate. `apiVersion`, `kind` and `metadata` at the root (and
//! in `x-kubernetes-embedded-resource` nodes) are never pruned or validated here; metadata has
//! its own rules.

use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::status::{FieldError, FieldErrorKind};

// === Types ===

/// One compiled schema node.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    ty: Option<Type>,
    nullable: bool,
    properties: BTreeMap<String, Schema>,
    required: Vec<String>,
    additional: Additional,
    items: Option<Box<Schema>>,
    enum_values: Option<Vec<Value>>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
    multiple_of: Option<f64>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    pattern: Option<(String, Regex)>,
    min_items: Option<usize>,
    max_items: Option<usize>,
    unique_items: bool,
    min_properties: Option<usize>,
    max_properties: Option<usize>,
    preserve_unknown: bool,
    int_or_string: bool,
    embedded_resource: bool,
    list_type: Option<String>,
    list_map_keys: Vec<String>,
    default: Option<Value>,
    all_of: Vec<Schema>,
    any_of: Vec<Schema>,
    one_of: Vec<Schema>,
    not: Option<Box<Schema>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
}

#[derive(Debug, Clone, Default)]
enum Additional {
    #[default]
    Unset,
    Allowed(bool),
    Schema(Box<Schema>),
}

/// What processing a custom resource against its schema found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Paths of fields dropped because the schema does not declare them.
    pub pruned: Vec<String>,
    /// Validation failures, in document order.
    pub errors: Vec<FieldError>,
}

const ENVELOPE: [&str; 3] = ["apiVersion", "kind", "metadata"];

// === Schema ===

impl Schema {
    /// Compiles an `openAPIV3Schema`. Errors are field errors under `path` (what a CRD create
    /// answers with 422).
    pub fn compile(value: &Value, path: &str) -> Result<Schema, Vec<FieldError>> {
        let mut errors = Vec::new();
        let schema = Self::compile_node(value, path, &mut errors);
        if errors.is_empty() {
            Ok(schema)
        } else {
            Err(errors)
        }
    }

    fn compile_node(value: &Value, path: &str, errors: &mut Vec<FieldError>) -> Schema {
        let Some(obj) = value.as_object() else {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                "must be an object",
            ));
            return Schema::default();
        };
        let mut s = Schema::default();
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        let count = |k: &str| obj.get(k).and_then(Value::as_u64).map(|n| n as usize);
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        if let Some(t) = obj.get("type") {
            s.ty = match t.as_str() {
                Some("object") => Some(Type::Object),
                Some("array") => Some(Type::Array),
                Some("string") => Some(Type::String),
                Some("integer") => Some(Type::Integer),
                Some("number") => Some(Type::Number),
                Some("boolean") => Some(Type::Boolean),
                _ => {
                    errors.push(FieldError::new(
                        format!("{path}.type"),
                        FieldErrorKind::NotSupported {
                            value: t.clone(),
                            supported: [
                                "array", "boolean", "integer", "number", "object", "string",
                            ]
                            .iter()
                            .map(|v| json!(v))
                            .collect(),
                        },
                    ));
                    None
                }
            };
        }
        s.nullable = flag("nullable");
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let child = Self::compile_node(v, &format!("{path}.properties[{k}]"), errors);
                s.properties.insert(k.clone(), child);
            }
        }
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            s.required = req
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
        }
        s.additional = match obj.get("additionalProperties") {
            None => Additional::Unset,
            Some(Value::Bool(b)) => Additional::Allowed(*b),
            Some(v) => Additional::Schema(Box::new(Self::compile_node(
                v,
                &format!("{path}.additionalProperties"),
                errors,
            ))),
        };
        if let Some(items) = obj.get("items") {
            s.items = Some(Box::new(Self::compile_node(
                items,
                &format!("{path}.items"),
                errors,
            )));
        }
        s.enum_values = obj.get("enum").and_then(Value::as_array).cloned();
        s.minimum = num("minimum");
        s.maximum = num("maximum");
        s.exclusive_minimum = flag("exclusiveMinimum");
        s.exclusive_maximum = flag("exclusiveMaximum");
        s.multiple_of = num("multipleOf");
        s.min_length = count("minLength");
        s.max_length = count("maxLength");
        s.min_items = count("minItems");
        s.max_items = count("maxItems");
        s.unique_items = flag("uniqueItems");
        s.min_properties = count("minProperties");
        s.max_properties = count("maxProperties");
        if let Some(p) = obj.get("pattern").and_then(Value::as_str) {
            match Regex::new(p) {
                Ok(re) => s.pattern = Some((p.to_string(), re)),
                Err(e) => errors.push(FieldError::invalid(
                    format!("{path}.pattern"),
                    json!(p),
                    format!("must be a valid regular expression, but isn't: {e}"),
                )),
            }
        }
        s.preserve_unknown = flag("x-kubernetes-preserve-unknown-fields");
        s.int_or_string = flag("x-kubernetes-int-or-string");
        s.embedded_resource = flag("x-kubernetes-embedded-resource");
        s.list_type = obj
            .get("x-kubernetes-list-type")
            .and_then(Value::as_str)
            .map(String::from);
        if let Some(keys) = obj
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
        {
            s.list_map_keys = keys
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
        }
        s.default = obj.get("default").cloned();
        let branches = |k: &str, errors: &mut Vec<FieldError>| -> Vec<Schema> {
            obj.get(k)
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .enumerate()
                        .map(|(i, v)| Self::compile_node(v, &format!("{path}.{k}[{i}]"), errors))
                        .collect()
                })
                .unwrap_or_default()
        };
        s.all_of = branches("allOf", errors);
        s.any_of = branches("anyOf", errors);
        s.one_of = branches("oneOf", errors);
        if let Some(n) = obj.get("not") {
            s.not = Some(Box::new(Self::compile_node(
                n,
                &format!("{path}.not"),
                errors,
            )));
        }
        s
    }

    /// Whether this schema declares a `status` property at its root (used to decide what a
    /// spec change is when there is no status subresource).
    pub fn has_property(&self, name: &str) -> bool {
        self.properties.contains_key(name)
    }

    /// Prunes, defaults and validates a whole custom resource in place.
    pub fn process(&self, obj: &mut Value, strict_unknown: bool) -> Outcome {
        let mut outcome = Outcome::default();
        self.prune(obj, "", true, &mut outcome.pruned);
        self.apply_defaults(obj, true);
        if strict_unknown {
            // Strict field validation rejects instead of dropping; report before validating.
            for p in &outcome.pruned {
                outcome.errors.push(FieldError::invalid(
                    p.clone(),
                    Value::Null,
                    "field not declared in schema",
                ));
            }
        }
        self.validate(obj, "", true, &mut outcome.errors);
        // Map iteration order depends on serde_json features elsewhere in the build; sort so
        // messages are stable (stable sort keeps per-field order: type, then bounds).
        outcome.pruned.sort();
        outcome.errors.sort_by(|a, b| a.field.cmp(&b.field));
        outcome
    }

    // --- pruning ---

    fn prune(&self, value: &mut Value, path: &str, envelope: bool, pruned: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if !matches!(self.ty, None | Some(Type::Object)) || self.int_or_string {
                    return; // wrong type: validation reports it, pruning leaves it alone
                }
                let keep_envelope = envelope || self.embedded_resource;
                let keep_unknown =
                    self.preserve_unknown || matches!(self.additional, Additional::Allowed(true));
                let mut drop = Vec::new();
                for (key, child) in map.iter_mut() {
                    if keep_envelope && ENVELOPE.contains(&key.as_str()) {
                        continue;
                    }
                    let child_path = join(path, key);
                    if let Some(s) = self.properties.get(key) {
                        s.prune(child, &child_path, false, pruned);
                    } else if let Additional::Schema(s) = &self.additional {
                        s.prune(child, &child_path, false, pruned);
                    } else if !keep_unknown {
                        drop.push(key.clone());
                        pruned.push(child_path);
                    }
                }
                for key in drop {
                    map.remove(&key);
                }
            }
            Value::Array(items) => {
                if let Some(s) = &self.items {
                    for (i, item) in items.iter_mut().enumerate() {
                        s.prune(item, &format!("{path}[{i}]"), false, pruned);
                    }
                }
            }
            _ => {}
        }
    }

    // --- defaulting ---

    fn apply_defaults(&self, value: &mut Value, envelope: bool) {
        match value {
            Value::Object(map) => {
                for (key, s) in &self.properties {
                    if envelope && ENVELOPE.contains(&key.as_str()) {
                        continue;
                    }
                    s.default_slot(map, key);
                }
                if let Additional::Schema(s) = &self.additional {
                    let keys: Vec<String> = map
                        .keys()
                        .filter(|k| !self.properties.contains_key(*k))
                        .cloned()
                        .collect();
                    for key in keys {
                        s.default_slot(map, &key);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(s) = &self.items {
                    for item in items {
                        s.apply_defaults(item, false);
                    }
                }
            }
            _ => {}
        }
    }

    /// Defaults one property slot of `map`: a non-nullable `null` is dropped (or replaced by
    /// the default), an absent field gets the default, then defaults apply inside it.
    fn default_slot(&self, map: &mut Map<String, Value>, key: &str) {
        match map.get(key) {
            Some(Value::Null) if !self.nullable => {
                map.remove(key);
            }
            _ => {}
        }
        if !map.contains_key(key)
            && let Some(d) = &self.default
        {
            map.insert(key.to_string(), d.clone());
        }
        if let Some(child) = map.get_mut(key) {
            self.apply_defaults(child, self.embedded_resource);
        }
    }

    // --- validation ---

    fn validate(&self, value: &Value, path: &str, envelope: bool, errors: &mut Vec<FieldError>) {
        if value.is_null() {
            if self.nullable {
                return;
            }
            if self.ty.is_some() || self.int_or_string {
                errors.push(self.type_error(value, path));
                return;
            }
        }
        if self.int_or_string {
            if !(is_integer(value) || value.is_string()) {
                errors.push(self.type_error(value, path));
                return;
            }
        } else if let Some(t) = self.ty
            && !type_matches(t, value)
        {
            errors.push(self.type_error(value, path));
            return;
        }

        if let Some(allowed) = &self.enum_values
            && !allowed.iter().any(|a| json_eq(a, value))
        {
            errors.push(FieldError::new(
                path,
                FieldErrorKind::NotSupported {
                    value: value.clone(),
                    supported: allowed.clone(),
                },
            ));
        }

        match value {
            Value::String(s) => self.validate_string(s, value, path, errors),
            Value::Number(n) => {
                if let Some(f) = n.as_f64() {
                    self.validate_number(f, value, path, errors);
                }
            }
            Value::Array(items) => self.validate_array(items, value, path, errors),
            Value::Object(map) => self.validate_object(map, value, path, envelope, errors),
            _ => {}
        }

        for s in &self.all_of {
            s.validate(value, path, envelope, errors);
        }
        if !self.any_of.is_empty() && !self.any_of.iter().any(|s| s.accepts(value, path, envelope))
        {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!(
                    "{} in body must validate at least one schema (anyOf)",
                    body(path)
                ),
            ));
        }
        if !self.one_of.is_empty() {
            let passing = self
                .one_of
                .iter()
                .filter(|s| s.accepts(value, path, envelope))
                .count();
            if passing != 1 {
                errors.push(FieldError::invalid(
                    path,
                    value.clone(),
                    format!(
                        "{} in body must validate one and only one schema (oneOf)",
                        body(path)
                    ),
                ));
            }
        }
        if let Some(n) = &self.not
            && n.accepts(value, path, envelope)
        {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!("{} in body must not validate the schema (not)", body(path)),
            ));
        }
    }

    fn accepts(&self, value: &Value, path: &str, envelope: bool) -> bool {
        let mut errs = Vec::new();
        self.validate(value, path, envelope, &mut errs);
        errs.is_empty()
    }

    fn type_error(&self, value: &Value, path: &str) -> FieldError {
        let expected = if self.int_or_string {
            "integer,string"
        } else {
            self.ty.map_or("object", Type::name)
        };
        let actual = type_name(value);
        FieldError::new(
            path,
            FieldErrorKind::TypeInvalid {
                value: json!(actual),
                detail: format!(
                    "{} in body must be of type {expected}: \"{actual}\"",
                    body(path)
                ),
            },
        )
    }

    fn validate_string(&self, s: &str, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
        let chars = s.chars().count();
        if let Some(max) = self.max_length
            && chars > max
        {
            errors.push(FieldError::new(path, FieldErrorKind::TooLong { max }));
        }
        if let Some(min) = self.min_length
            && chars < min
        {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!("{} in body should be at least {min} chars long", body(path)),
            ));
        }
        if let Some((src, re)) = &self.pattern
            && !re.is_match(s)
        {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!("{} in body should match '{src}'", body(path)),
            ));
        }
    }

    fn validate_number(&self, f: f64, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
        if let Some(min) = self.minimum {
            let bad = if self.exclusive_minimum {
                f <= min
            } else {
                f < min
            };
            if bad {
                let rel = if self.exclusive_minimum {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                errors.push(FieldError::invalid(
                    path,
                    value.clone(),
                    format!("{} in body should be {rel} {}", body(path), fmt_num(min)),
                ));
            }
        }
        if let Some(max) = self.maximum {
            let bad = if self.exclusive_maximum {
                f >= max
            } else {
                f > max
            };
            if bad {
                let rel = if self.exclusive_maximum {
                    "less than"
                } else {
                    "less than or equal to"
                };
                errors.push(FieldError::invalid(
                    path,
                    value.clone(),
                    format!("{} in body should be {rel} {}", body(path), fmt_num(max)),
                ));
            }
        }
        if let Some(m) = self.multiple_of
            && m != 0.0
            && (f / m).fract().abs() > 1e-9
        {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!(
                    "{} in body should be a multiple of {}",
                    body(path),
                    fmt_num(m)
                ),
            ));
        }
    }

    fn validate_array(
        &self,
        items: &[Value],
        value: &Value,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) {
        if let Some(max) = self.max_items
            && items.len() > max
        {
            errors.push(FieldError::new(
                path,
                FieldErrorKind::TooMany {
                    actual: items.len(),
                    max,
                },
            ));
        }
        if let Some(min) = self.min_items
            && items.len() < min
        {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!("{} in body should have at least {min} items", body(path)),
            ));
        }
        if self.unique_items && has_duplicates(items.iter()) {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!("{} in body shouldn't contain duplicates", body(path)),
            ));
        }
        match self.list_type.as_deref() {
            Some("set") => {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.to_string()) {
                        errors.push(FieldError::new(
                            format!("{path}[{i}]"),
                            FieldErrorKind::Duplicate(item.clone()),
                        ));
                    }
                }
            }
            Some("map") if !self.list_map_keys.is_empty() => {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Map<String, Value> = self
                        .list_map_keys
                        .iter()
                        .map(|k| (k.clone(), item.get(k).cloned().unwrap_or(Value::Null)))
                        .collect();
                    let key = Value::Object(key);
                    if !seen.insert(key.to_string()) {
                        errors.push(FieldError::new(
                            format!("{path}[{i}]"),
                            FieldErrorKind::Duplicate(key),
                        ));
                    }
                }
            }
            _ => {}
        }
        if let Some(s) = &self.items {
            for (i, item) in items.iter().enumerate() {
                s.validate(item, &format!("{path}[{i}]"), false, errors);
            }
        }
    }

    fn validate_object(
        &self,
        map: &Map<String, Value>,
        value: &Value,
        path: &str,
        envelope: bool,
        errors: &mut Vec<FieldError>,
    ) {
        let skip_envelope = envelope || self.embedded_resource;
        if let Some(max) = self.max_properties
            && map.len() > max
        {
            errors.push(FieldError::new(
                path,
                FieldErrorKind::TooMany {
                    actual: map.len(),
                    max,
                },
            ));
        }
        if let Some(min) = self.min_properties
            && map.len() < min
        {
            errors.push(FieldError::invalid(
                path,
                value.clone(),
                format!(
                    "{} in body should have at least {min} properties",
                    body(path)
                ),
            ));
        }
        for key in &self.required {
            if !map.contains_key(key) {
                errors.push(FieldError::required(join(path, key), ""));
            }
        }
        for (key, child) in map {
            if skip_envelope && ENVELOPE.contains(&key.as_str()) {
                continue;
            }
            let child_path = join(path, key);
            if let Some(s) = self.properties.get(key) {
                s.validate(child, &child_path, false, errors);
            } else if let Additional::Schema(s) = &self.additional {
                s.validate(child, &child_path, false, errors);
            }
        }
    }
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Object => "object",
            Type::Array => "array",
            Type::String => "string",
            Type::Integer => "integer",
            Type::Number => "number",
            Type::Boolean => "boolean",
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The `<path> in body` prefix; the real server says `body` alone for the root.
fn body(path: &str) -> &str {
    if path.is_empty() { "body" } else { path }
}

/// JSON integers, and floats with no fractional part (Go decodes `1.0` as a float that still
/// passes `type: integer`).
fn is_integer(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    }
}

fn type_matches(t: Type, v: &Value) -> bool {
    match t {
        Type::Object => v.is_object(),
        Type::Array => v.is_array(),
        Type::String => v.is_string(),
        Type::Integer => is_integer(v),
        Type::Number => v.is_number(),
        Type::Boolean => v.is_boolean(),
    }
}

/// The Go-side type name of a decoded JSON value, as used in the real type errors.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Equality with numbers compared by value (`1` equals `1.0`), as Go's decoded values do.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn has_duplicates<'a>(items: impl Iterator<Item = &'a Value>) -> bool {
    let mut seen = BTreeSet::new();
    items.into_iter().any(|v| !seen.insert(v.to_string()))
}

fn fmt_num(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(v: Value) -> Schema {
        match Schema::compile(&v, "openAPIV3Schema") {
            Ok(s) => s,
            Err(e) => panic!("{e:?}"),
        }
    }

    fn mesh_schema() -> Schema {
        schema(json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["traffic"],
                    "properties": {
                        "traffic": {
                            "type": "object",
                            "properties": {
                                "enableEgress": {"type": "boolean", "default": false},
                                "mode": {"type": "string", "enum": ["permissive", "strict"]},
                                "port": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
                                "name": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
                                "target": {"x-kubernetes-int-or-string": true},
                                "ratio": {"type": "number", "nullable": true},
                                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                "withDefaults": {
                                    "type": "object",
                                    "default": {},
                                    "properties": {"level": {"type": "string", "default": "info"}}
                                }
                            }
                        }
                    }
                },
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }
        }))
    }

    fn run(s: &Schema, mut obj: Value) -> (Value, Outcome) {
        let outcome = s.process(&mut obj, false);
        (obj, outcome)
    }

    fn messages(o: &Outcome) -> Vec<String> {
        o.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn type_error_has_real_server_wording() {
        let (_, o) = run(
            &mesh_schema(),
            json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"},
                   "spec": {"traffic": {"enableEgress": "yes"}}}),
        );
        assert_eq!(
            messages(&o),
            vec![
                "spec.traffic.enableEgress: Invalid value: \"string\": spec.traffic.enableEgress in body must be of type boolean: \"string\""
            ]
        );
        assert_eq!(o.errors[0].field, "spec.traffic.enableEgress");
        assert_eq!(o.errors[0].kind.reason(), "FieldValueTypeInvalid");
    }

    #[test]
    fn required_enum_bounds_and_strings() {
        let (_, o) = run(&mesh_schema(), json!({"spec": {}}));
        assert_eq!(messages(&o), vec!["spec.traffic: Required value"]);

        let (_, o) = run(
            &mesh_schema(),
            json!({"spec": {"traffic": {"mode": "loose", "port": 0, "name": "ABCDEFG"}}}),
        );
        assert_eq!(
            messages(&o),
            vec![
                "spec.traffic.mode: Unsupported value: \"loose\": supported values: \"permissive\", \"strict\"",
                "spec.traffic.name: Too long: may not be more than 5 bytes",
                "spec.traffic.name: Invalid value: \"ABCDEFG\": spec.traffic.name in body should match '^[a-z]+$'",
                "spec.traffic.port: Invalid value: 0: spec.traffic.port in body should be greater than or equal to 1",
            ]
        );
        let (_, o) = run(
            &mesh_schema(),
            json!({"spec": {"traffic": {"port": 70000, "name": "a"}}}),
        );
        assert_eq!(
            messages(&o),
            vec![
                "spec.traffic.name: Invalid value: \"a\": spec.traffic.name in body should be at least 2 chars long",
                "spec.traffic.port: Invalid value: 70000: spec.traffic.port in body should be less than or equal to 65535",
            ]
        );
    }

    #[test]
    fn integers_numbers_and_int_or_string() {
        let s = mesh_schema();
        let (_, o) = run(&s, json!({"spec": {"traffic": {"port": 80.5}}}));
        assert_eq!(o.errors[0].field, "spec.traffic.port");
        assert!(
            o.errors[0]
                .to_string()
                .contains("must be of type integer: \"number\"")
        );
        let (_, o) = run(
            &s,
            json!({"spec": {"traffic": {"port": 80.0, "target": "http", "ratio": null}}}),
        );
        assert!(o.errors.is_empty(), "{:?}", messages(&o));
        let (_, o) = run(&s, json!({"spec": {"traffic": {"target": 8080}}}));
        assert!(o.errors.is_empty());
        let (_, o) = run(&s, json!({"spec": {"traffic": {"target": true}}}));
        assert_eq!(o.errors.len(), 1);
        assert!(
            o.errors[0]
                .to_string()
                .contains("must be of type integer,string")
        );
    }

    #[test]
    fn arrays_and_maps() {
        let s = mesh_schema();
        let (_, o) = run(
            &s,
            json!({"spec": {"traffic": {"tags": ["a", 1, "c"], "labels": {"x": 1}}}}),
        );
        assert_eq!(
            messages(&o),
            vec![
                "spec.traffic.labels.x: Invalid value: \"integer\": spec.traffic.labels.x in body must be of type string: \"integer\"",
                "spec.traffic.tags: Too many: 3: must have at most 2 items",
                "spec.traffic.tags[1]: Invalid value: \"integer\": spec.traffic.tags[1] in body must be of type string: \"integer\"",
            ]
        );
    }

    #[test]
    fn prunes_unknown_fields_but_keeps_envelope_and_preserved() {
        let (obj, o) = run(
            &mesh_schema(),
            json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a", "labels": {"l": "v"}},
                   "spec": {"bogus": 1, "traffic": {"free": {"any": {"thing": 1}}, "other": true}},
                   "status": {"whatever": [1]}, "extra": "x"}),
        );
        assert!(o.errors.is_empty(), "{:?}", messages(&o));
        assert_eq!(o.pruned, vec!["extra", "spec.bogus", "spec.traffic.other"]);
        assert_eq!(obj["metadata"]["labels"]["l"], "v");
        assert_eq!(obj["spec"]["traffic"]["free"]["any"]["thing"], 1);
        assert_eq!(obj["status"]["whatever"][0], 1);
        assert!(obj.get("extra").is_none());
        assert!(obj["spec"].get("bogus").is_none());
    }

    #[test]
    fn defaults_apply_and_nulls_drop() {
        let (obj, o) = run(
            &mesh_schema(),
            json!({"spec": {"traffic": {"enableEgress": null, "mode": null}}}),
        );
        assert!(o.errors.is_empty(), "{:?}", messages(&o));
        assert_eq!(obj["spec"]["traffic"]["enableEgress"], false);
        assert!(obj["spec"]["traffic"].get("mode").is_none());
        assert_eq!(obj["spec"]["traffic"]["withDefaults"]["level"], "info");
    }

    #[test]
    fn strict_mode_reports_unknown_fields() {
        let mut obj = json!({"spec": {"traffic": {}, "bogus": 1}});
        let o = mesh_schema().process(&mut obj, true);
        assert_eq!(o.errors.len(), 1);
        assert_eq!(o.errors[0].field, "spec.bogus");
    }

    #[test]
    fn combinators() {
        let s = schema(json!({"type": "object", "properties": {
            "a": {"type": "integer", "anyOf": [{"minimum": 10}, {"maximum": 0}]},
            "b": {"type": "string", "not": {"enum": ["bad"]}},
            "c": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                  "oneOf": [{"required": ["x"]}, {"required": ["y"]}]}
        }}));
        let (_, o) = run(&s, json!({"a": 5, "b": "bad", "c": {"x": 1, "y": 2}}));
        let m = messages(&o);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[0].contains("must validate at least one schema (anyOf)"));
        assert!(m[1].contains("must not validate the schema (not)"));
        assert!(m[2].contains("must validate one and only one schema (oneOf)"));
        let (_, o) = run(&s, json!({"a": 11, "b": "good", "c": {"x": 1}}));
        assert!(o.errors.is_empty());
    }

    #[test]
    fn list_types() {
        let s = schema(json!({"type": "object", "properties": {
            "set": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "map": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "properties": {"name": {"type": "string"}, "v": {"type": "integer"}}}}
        }}));
        let (_, o) = run(
            &s,
            json!({"set": ["a", "a"], "map": [{"name": "x", "v": 1}, {"name": "x", "v": 2}]}),
        );
        assert_eq!(
            messages(&o),
            vec![
                "map[1]: Duplicate value: {\"name\":\"x\"}",
                "set[1]: Duplicate value: \"a\""
            ]
        );
    }

    #[test]
    fn compile_rejects_bad_schemas() {
        let err = Schema::compile(
            &json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}),
            "s",
        );
        assert!(err.is_err());
        let err = Schema::compile(&json!({"type": "strin"}), "s");
        assert!(err.is_err_and(|e| e[0].field == "s.type"));
    }
}
