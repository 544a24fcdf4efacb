//! The configuration file's JSON Schema, generated from the types that read it (so that it
//! cannot drift from them), and the Helm chart's `config` value derived from it.

use serde_json::{json, Value};

use super::Config;

/// The JSON Schema (draft-07, every subschema inline) of the configuration file as sluice
/// reads it: every table refuses unknown keys, every key has its type and description.
pub fn config_schema() -> Value {
    let generator =
        schemars::generate::SchemaSettings::draft07().with(|s| s.inline_subschemas = true).into_generator();
    let mut schema = generator.into_root_schema_for::<Config>().to_value();
    tidy(&mut schema);
    schema
}

/// The schema of the chart's `config` value: the configuration file's, without the keys the
/// chart sets itself and without secrets (which come from Kubernetes Secrets), and with the
/// target's kinds written as `if`/`then` so that a mistake is reported against the kind
/// chosen rather than as "none of the kinds matched".
pub fn chart_config_schema() -> Value {
    let mut schema = config_schema();
    let root = schema.as_object_mut().expect("a schema object");
    for key in ["$schema", "title"] {
        root.remove(key);
    }
    root.insert(
        "description".into(),
        json!(
            "The sluice configuration file (README: Configuration reference), generated from \
             sluice's own configuration types (`sluice config-schema`). The chart sets \
             monitoring.listen, source.replication.spill_dir and target.mapping; passwords and \
             AWS keys come from Secrets (postgresPassword, targetPostgresPassword, aws)."
        ),
    );
    // Set by the chart.
    remove(&mut schema, &["properties", "monitoring"], "listen");
    remove(&mut schema, &["properties", "source", "properties", "replication"], "spill_dir");
    // Secrets: from Kubernetes Secrets, never from values.
    remove(&mut schema, &["properties", "source", "properties", "connection"], "password");
    if let Some(kinds) =
        pointer_mut(&mut schema, &["properties", "target", "oneOf"]).and_then(Value::as_array_mut)
    {
        for kind in kinds.iter_mut() {
            let name = kind.pointer("/properties/kind/const").and_then(Value::as_str).map(str::to_owned);
            match name.as_deref() {
                Some("dynamodb") => {
                    remove(kind, &[], "mapping");
                    remove(kind, &[], "secret_access_key");
                }
                Some("postgres") => {
                    remove(kind, &[], "mapping");
                    remove(kind, &["properties", "connection"], "password");
                }
                _ => {}
            }
        }
    }
    target_kinds_as_conditions(&mut schema);
    schema
}

/// The chart's values schema with its `config` property replaced by [`chart_config_schema`].
pub fn with_chart_config(values_schema: &Value) -> Value {
    let mut values = values_schema.clone();
    if let Some(properties) = values.get_mut("properties").and_then(Value::as_object_mut) {
        properties.insert("config".into(), chart_config_schema());
    }
    values
}

/// Removes `key` from the `properties` (and `required`) of the object schema at `path`.
fn remove(schema: &mut Value, path: &[&str], key: &str) {
    let Some(object) = pointer_mut(schema, path).and_then(Value::as_object_mut) else { return };
    if let Some(properties) = object.get_mut("properties").and_then(Value::as_object_mut) {
        properties.remove(key);
    }
    if let Some(required) = object.get_mut("required").and_then(Value::as_array_mut) {
        required.retain(|k| k != key);
    }
}

fn pointer_mut<'a>(schema: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(schema, |value, key| value.get_mut(*key))
}

/// `target`'s `oneOf` over the kinds becomes `kind`'s enum and one `if kind = K then …` per
/// kind: a wrong key under a DynamoDB target is then named as such.
fn target_kinds_as_conditions(schema: &mut Value) {
    let Some(target) = pointer_mut(schema, &["properties", "target"]).and_then(Value::as_object_mut) else {
        return;
    };
    let Some(Value::Array(kinds)) = target.remove("oneOf") else { return };
    let mut names = Vec::new();
    let mut conditions = Vec::new();
    for kind in kinds {
        let Some(name) = kind.pointer("/properties/kind/const").cloned() else { continue };
        names.push(name.clone());
        conditions.push(json!({
            "if": { "properties": { "kind": { "const": name } }, "required": ["kind"] },
            "then": kind,
        }));
    }
    target.insert("type".into(), json!("object"));
    target.insert("required".into(), json!(["kind"]));
    target.insert("properties".into(), json!({ "kind": { "enum": names } }));
    target.insert("allOf".into(), Value::Array(conditions));
}

/// Makes the generated schema read as the file is written: durations' defaults as `"10s"`
/// (not serde's `{secs, nanos}`); a unit enum's `oneOf` of constants as one `enum` (a
/// validator then says "must be one of …" rather than "none matched"), its variants'
/// descriptions kept in the key's; no `format` annotations of integer widths (`uint16`: not
/// JSON Schema formats); no empty `required` lists.
fn tidy(value: &mut Value) {
    match value {
        Value::Object(object) => {
            if let Some(default) = object.get_mut("default") {
                if let (Some(secs), Some(nanos)) = (
                    default.get("secs").and_then(Value::as_u64),
                    default.get("nanos").and_then(Value::as_u64),
                ) {
                    *default = json!(duration_text(secs, nanos));
                }
            }
            if let Some(Value::Array(variants)) = object.get("oneOf") {
                let constants: Option<Vec<(Value, Option<String>)>> = variants
                    .iter()
                    .map(|v| {
                        let only_const = v
                            .as_object()?
                            .keys()
                            .all(|k| ["const", "description", "type"].contains(&k.as_str()));
                        only_const
                            .then(|| {
                                (
                                    v.get("const").cloned(),
                                    v.get("description").and_then(Value::as_str).map(str::to_owned),
                                )
                            })
                            .and_then(|(c, d)| Some((c?, d)))
                    })
                    .collect();
                if let Some(constants) = constants {
                    let mut description =
                        object.get("description").and_then(Value::as_str).unwrap_or("").to_owned();
                    for (constant, text) in &constants {
                        if let (Some(name), Some(text)) = (constant.as_str(), text) {
                            description.push_str(&format!("\n- {name}: {text}"));
                        }
                    }
                    object.remove("oneOf");
                    object
                        .insert("enum".into(), Value::Array(constants.into_iter().map(|(c, _)| c).collect()));
                    if !description.is_empty() {
                        object.insert("description".into(), json!(description.trim_start()));
                    }
                }
            }
            if object
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| f.starts_with("int") || f.starts_with("uint"))
            {
                object.remove("format");
            }
            if object.get("required").and_then(Value::as_array).is_some_and(Vec::is_empty) {
                object.remove("required");
            }
            object.values_mut().for_each(tidy);
        }
        Value::Array(items) => items.iter_mut().for_each(tidy),
        _ => {}
    }
}

/// A duration as the configuration file writes it: the largest unit that divides it.
fn duration_text(secs: u64, nanos: u64) -> String {
    match (secs, nanos) {
        (s, 0) if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        (s, 0) if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        (s, 0) => format!("{s}s"),
        (s, n) => format!("{}ms", s * 1000 + n / 1_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A validator-free check of the generated schema's shape: every table refuses unknown
    /// keys, durations carry their pattern, the source's two ways and the target's kinds are
    /// there.
    #[test]
    fn the_generated_schema_is_strict_everywhere() {
        let schema = config_schema();
        fn objects_are_closed(path: &str, value: &Value) {
            if let Some(object) = value.as_object() {
                let is_object =
                    |t: &Value| t == "object" || t.as_array().is_some_and(|a| a.contains(&json!("object")));
                if object.get("type").is_some_and(is_object) && object.contains_key("properties") {
                    assert_eq!(
                        object.get("additionalProperties"),
                        Some(&Value::Bool(false)),
                        "{path} accepts unknown keys"
                    );
                }
                for (key, child) in object {
                    objects_are_closed(&format!("{path}/{key}"), child);
                }
            } else if let Some(items) = value.as_array() {
                for (i, child) in items.iter().enumerate() {
                    objects_are_closed(&format!("{path}/{i}"), child);
                }
            }
        }
        objects_are_closed("", &schema);
        assert_eq!(
            schema.pointer("/properties/pipeline/properties/retry_for/pattern"),
            Some(&json!("^[0-9]+(ms|s|m|h)$"))
        );
        assert!(schema.pointer("/properties/source/properties/poll").is_some());
        assert_eq!(schema.pointer("/properties/pipeline/properties/retry_for/default"), Some(&json!("5m")));
        assert_eq!(
            schema.pointer("/properties/source/properties/connection/properties/sslmode/enum"),
            Some(&json!(["disable", "require", "verify-full"]))
        );
        let kinds: Vec<_> = schema
            .pointer("/properties/target/oneOf")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|k| k.pointer("/properties/kind/const").cloned())
            .collect();
        assert_eq!(
            kinds,
            [json!("dynamodb"), json!("kafka"), json!("postgres"), json!("jsonl"), json!("null")]
        );
    }

    #[test]
    fn the_chart_schema_leaves_out_what_the_chart_sets_and_secrets() {
        let schema = chart_config_schema();
        assert!(schema.pointer("/properties/monitoring/properties/listen").is_none());
        assert!(schema.pointer("/properties/monitoring/properties/ready_max_lag").is_some());
        assert!(schema.pointer("/properties/source/properties/connection/properties/password").is_none());
        assert!(schema.pointer("/properties/source/properties/connection/properties/dbname").is_some());
        let kinds = schema.pointer("/properties/target/allOf").unwrap().as_array().unwrap();
        let dynamodb = kinds
            .iter()
            .find(|k| k.pointer("/if/properties/kind/const") == Some(&json!("dynamodb")))
            .unwrap();
        assert!(dynamodb.pointer("/then/properties/secret_access_key").is_none());
        assert!(dynamodb.pointer("/then/properties/endpoint_url").is_some());
    }
}
