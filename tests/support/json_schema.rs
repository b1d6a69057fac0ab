//! A small JSON Schema (draft 2020-12) validator for the keywords nodedrain's documented schemas
//! use. A keyword it does not know is itself an error, so a schema can never claim more than the
//! tests check.

use serde_json::Value;

/// Keywords that only annotate.
const ANNOTATIONS: [&str; 5] = ["$schema", "$id", "title", "description", "$comment"];

/// Every violation of `schema` by `instance`, each prefixed by its JSON pointer; empty when the
/// instance is valid.
pub fn validate(schema: &Value, instance: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, schema, instance, "", &mut errors);
    errors
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    }
}

fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    root.pointer(pointer)
}

fn check(root: &Value, schema: &Value, instance: &Value, at: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            errors.push(format!("{at}: no value is allowed here"));
        }
        return;
    };
    for (keyword, value) in schema {
        match keyword.as_str() {
            k if ANNOTATIONS.contains(&k) => {}
            "$defs" => {}
            "$ref" => match value.as_str().and_then(|r| resolve(root, r)) {
                Some(target) => check(root, target, instance, at, errors),
                None => errors.push(format!("{at}: unresolvable $ref {value}")),
            },
            "type" => {
                let names: Vec<&str> = match value {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => vec![],
                };
                if !names.iter().any(|n| type_matches(n, instance)) {
                    errors.push(format!("{at}: {instance} is not of type {value}"));
                }
            }
            "const" => {
                if instance != value {
                    errors.push(format!("{at}: {instance} is not {value}"));
                }
            }
            "enum" => {
                if !value.as_array().is_some_and(|a| a.contains(instance)) {
                    errors.push(format!("{at}: {instance} is not one of {value}"));
                }
            }
            "minimum" => {
                if let (Some(have), Some(min)) = (instance.as_f64(), value.as_f64())
                    && have < min
                {
                    errors.push(format!("{at}: {have} is less than {min}"));
                }
            }
            "minLength" => {
                if let (Some(s), Some(min)) = (instance.as_str(), value.as_u64())
                    && (s.chars().count() as u64) < min
                {
                    errors.push(format!("{at}: {s:?} is shorter than {min}"));
                }
            }
            "required" => {
                if let Some(object) = instance.as_object() {
                    for name in value
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                    {
                        if !object.contains_key(name) {
                            errors.push(format!("{at}: missing required property {name:?}"));
                        }
                    }
                }
            }
            "properties" => {
                if let (Some(object), Some(properties)) = (instance.as_object(), value.as_object())
                {
                    for (name, property) in properties {
                        if let Some(child) = object.get(name) {
                            check(root, property, child, &format!("{at}/{name}"), errors);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = instance.as_object() {
                    let known = schema.get("properties").and_then(Value::as_object);
                    for (name, child) in object {
                        if known.is_some_and(|k| k.contains_key(name)) {
                            continue;
                        }
                        check(root, value, child, &format!("{at}/{name}"), errors);
                    }
                }
            }
            "items" => {
                if let Some(array) = instance.as_array() {
                    for (i, child) in array.iter().enumerate() {
                        check(root, value, child, &format!("{at}/{i}"), errors);
                    }
                }
            }
            "anyOf" => {
                let branches = value.as_array().cloned().unwrap_or_default();
                let any = branches.iter().any(|branch| {
                    let mut branch_errors = Vec::new();
                    check(root, branch, instance, at, &mut branch_errors);
                    branch_errors.is_empty()
                });
                if !any {
                    errors.push(format!("{at}: {instance} matches none of {value}"));
                }
            }
            other => errors.push(format!("{at}: schema keyword {other:?} is not supported")),
        }
    }
}
