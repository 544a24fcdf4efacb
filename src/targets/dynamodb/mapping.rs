//! The mapping format (`schemas/README.md` documents it; `schemas/mapping.schema.json` is its
//! JSON Schema): which source tables feed which DynamoDB table, how keys are built, which
//! columns are renamed, dropped or typed how, and which rows are kept.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use sluice_core::Problem;

use crate::translate::filter::filter_problems;
use crate::translate::mapping::{Constant, MappingFile, Predicate};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// The attribute that holds the source position of the change an item reflects.
    #[serde(default = "default_version_attribute")]
    pub version_attribute: String,
    /// What a TRUNCATE of a mapped table does.
    #[serde(default)]
    pub on_truncate: TruncatePolicy,
    #[serde(default)]
    pub tombstones: Tombstones,
    pub tables: Vec<TableMapping>,
}

fn default_version_attribute() -> String {
    "_version".into()
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TruncatePolicy {
    /// Stop with an error naming the table: a truncate cannot be mirrored item by item.
    #[default]
    Error,
    /// Skip it (the target keeps its items).
    Ignore,
}

/// Deleted rows can leave a tombstone: an item holding only the key, the version and a marker,
/// so that a late write of an older position (a replay, a backfill row) cannot resurrect it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstones {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_marker")]
    pub marker_attribute: String,
    /// A TTL attribute (epoch seconds) set on tombstones so DynamoDB expires them.
    #[serde(default)]
    pub ttl_attribute: Option<String>,
    #[serde(default = "default_tombstone_ttl", deserialize_with = "sluice_core::duration::deserialize")]
    pub ttl: Duration,
}

impl Default for Tombstones {
    fn default() -> Self {
        Tombstones {
            enabled: true,
            marker_attribute: default_marker(),
            ttl_attribute: None,
            ttl: default_tombstone_ttl(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_marker() -> String {
    "_deleted".into()
}
fn default_tombstone_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableMapping {
    /// `schema.table` in Postgres.
    pub source: String,
    /// The DynamoDB table.
    pub target: String,
    pub partition_key: KeyMapping,
    #[serde(default)]
    pub sort_key: Option<KeyMapping>,
    /// Column → attribute name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Columns never written (secrets, PII). They may still appear in key templates.
    #[serde(default)]
    pub drop: Vec<String>,
    /// Attributes added to every item (an entity type, for single-table designs).
    #[serde(default)]
    pub constants: BTreeMap<String, Constant>,
    /// Per-column type rules.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnRule>,
    /// Rows must satisfy every predicate; a row that stops satisfying them deletes its item.
    #[serde(default)]
    pub filter: Vec<Predicate>,
    /// NULL columns: left out of the item (default) or written as NULL.
    #[serde(default)]
    pub nulls: NullPolicy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyMapping {
    pub attribute: String,
    /// Literal text with `{column}` placeholders: `"ORDER#{created_at}#{id}"`.
    pub template: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRule {
    /// How the value is written; the default depends on the column type (README table).
    #[serde(rename = "as", default)]
    pub as_: Option<AttrKind>,
    #[serde(default)]
    pub nulls: Option<NullPolicy>,
}

/// Target representations a column rule can ask for.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AttrKind {
    /// N (numbers, numerics within 38 significant digits).
    Number,
    /// S (any value as its text).
    String,
    /// S, ISO 8601 (timestamps, dates).
    Iso8601,
    /// N, milliseconds since 1970 (timestamps, timestamptz, dates).
    EpochMillis,
    /// M or L (json, jsonb).
    Map,
    /// L (arrays).
    List,
    /// SS or NS (arrays of text or numbers; duplicates collapse, NULLs are errors).
    Set,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NullPolicy {
    #[default]
    Omit,
    Null,
}

/// A parsed key template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Column(String),
}

/// Splits `"USER#{id}"` into literal and column segments. `{{` and `}}` are literal braces.
pub fn parse_template(template: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut column = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => column.push(c),
                        None => return Err(format!("unclosed '{{' in {template:?}")),
                    }
                }
                if column.is_empty() {
                    return Err(format!("empty placeholder '{{}}' in {template:?}"));
                }
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(Segment::Column(column));
            }
            '}' => return Err(format!("unmatched '}}' in {template:?}")),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    if segments.is_empty() {
        return Err("a key template must not be empty".into());
    }
    Ok(segments)
}

/// Matches `text` against literal and column segments (each column takes the shortest text up
/// to the next literal); the columns' values, or None when the text does not fit.
pub(crate) fn match_template(segments: &[Segment], text: &str) -> Option<Vec<(String, String)>> {
    let mut values = Vec::new();
    let mut rest = text;
    let mut iter = segments.iter().peekable();
    while let Some(segment) = iter.next() {
        match segment {
            Segment::Literal(literal) => rest = rest.strip_prefix(literal.as_str())?,
            Segment::Column(column) => {
                let value = match iter.peek() {
                    Some(Segment::Literal(next)) => {
                        let end = rest.find(next.as_str())?;
                        let (value, after) = rest.split_at(end);
                        rest = after;
                        value
                    }
                    Some(Segment::Column(_)) => return None,
                    None => std::mem::take(&mut rest),
                };
                values.push((column.clone(), value.to_owned()));
            }
        }
    }
    rest.is_empty().then_some(values)
}

/// The mapping's key attributes with their templates: the partition key's, then the sort key's.
pub(crate) fn key_templates(mapping: &TableMapping) -> Vec<(&String, &String)> {
    let mut templates = vec![(&mapping.partition_key.attribute, &mapping.partition_key.template)];
    if let Some(sort) = &mapping.sort_key {
        templates.push((&sort.attribute, &sort.template));
    }
    templates
}

impl MappingFile for Mapping {
    fn sources(&self) -> Vec<&str> {
        self.tables.iter().map(|t| t.source.as_str()).collect()
    }

    /// Problems visible without the database: templates, names, collisions.
    fn problems(&self, problems: &mut Vec<Problem>) {
        for (i, table) in self.tables.iter().enumerate() {
            let prefix = format!("mapping.tables[{i}]");
            if table.source.split('.').count() != 2 {
                problems.push(Problem::new(
                    &prefix,
                    "source",
                    format!("{:?} must be schema.table", table.source),
                ));
            }
            if table.target.len() < 3 || table.target.len() > 255 {
                problems.push(Problem::new(&prefix, "target", "DynamoDB table names are 3-255 characters"));
            }
            for (name, key) in
                [("partition_key", Some(&table.partition_key)), ("sort_key", table.sort_key.as_ref())]
            {
                let Some(key) = key else { continue };
                if let Err(message) = parse_template(&key.template) {
                    problems.push(Problem::new(&prefix, &format!("{name}.template"), message));
                }
                if key.attribute.is_empty() {
                    problems.push(Problem::new(&prefix, &format!("{name}.attribute"), "must not be empty"));
                }
            }
            let reserved: Vec<&str> = [
                Some(table.partition_key.attribute.as_str()),
                table.sort_key.as_ref().map(|k| k.attribute.as_str()),
                Some(self.version_attribute.as_str()),
                Some(self.tombstones.marker_attribute.as_str()),
            ]
            .into_iter()
            .flatten()
            .collect();
            for (column, attribute) in &table.rename {
                if reserved.contains(&attribute.as_str()) {
                    problems.push(Problem::new(
                        &prefix,
                        &format!("rename.{column}"),
                        format!("{attribute:?} is a key, version or tombstone attribute"),
                    ));
                }
            }
            for name in table.constants.keys() {
                if reserved.contains(&name.as_str()) {
                    problems.push(Problem::new(
                        &prefix,
                        &format!("constants.{name}"),
                        "collides with a key, version or tombstone attribute",
                    ));
                }
            }
            filter_problems(&prefix, &table.filter, problems);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subset of JSON Schema that `schemas/mapping.schema.json` uses.
    fn conforms(
        schema: &serde_json::Value,
        root: &serde_json::Value,
        value: &serde_json::Value,
        path: &str,
        errors: &mut Vec<String>,
    ) {
        use serde_json::Value as J;
        if let Some(reference) = schema.get("$ref").and_then(J::as_str) {
            let name = reference.trim_start_matches("#/$defs/");
            return conforms(&root["$defs"][name], root, value, path, errors);
        }
        if let Some(options) = schema.get("oneOf").and_then(J::as_array) {
            let matching = options.iter().filter(|o| {
                let mut e = Vec::new();
                conforms(o, root, value, path, &mut e);
                e.is_empty()
            });
            if matching.count() == 0 {
                errors.push(format!("{path}: matches no alternative"));
            }
            return;
        }
        let type_ok = match schema.get("type").and_then(J::as_str) {
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("boolean") => value.is_boolean(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            _ => true,
        };
        if !type_ok {
            errors.push(format!("{path}: wrong type"));
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(J::as_array) {
            if !allowed.contains(value) {
                errors.push(format!("{path}: not one of {allowed:?}"));
            }
        }
        if let Some(object) = value.as_object() {
            let properties = schema.get("properties").and_then(J::as_object);
            for required in schema.get("required").and_then(J::as_array).into_iter().flatten() {
                if !object.contains_key(required.as_str().unwrap()) {
                    errors.push(format!("{path}: missing {required}"));
                }
            }
            for (key, item) in object {
                match (properties.and_then(|p| p.get(key)), schema.get("additionalProperties")) {
                    (Some(sub), _) => conforms(sub, root, item, &format!("{path}.{key}"), errors),
                    (None, Some(J::Bool(false))) => errors.push(format!("{path}: unknown key {key}")),
                    (None, Some(sub)) if sub.is_object() => {
                        conforms(sub, root, item, &format!("{path}.{key}"), errors)
                    }
                    _ => {}
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                conforms(items, root, item, &format!("{path}[{i}]"), errors);
            }
        }
    }

    fn schema_errors(toml_text: &str) -> Vec<String> {
        schema_errors_for(include_str!("../../../schemas/mapping.schema.json"), toml_text)
    }

    fn schema_errors_for(schema_text: &str, toml_text: &str) -> Vec<String> {
        let schema: serde_json::Value = serde_json::from_str(schema_text).expect("the schema is JSON");
        let document: serde_json::Value =
            serde_json::to_value(toml::from_str::<toml::Value>(toml_text).unwrap()).unwrap();
        let mut errors = Vec::new();
        conforms(&schema, &schema, &document, "mapping", &mut errors);
        errors
    }

    #[test]
    fn worked_examples_conform_to_the_json_schema_and_parse() {
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/examples")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(schema_errors(&text), Vec::<String>::new(), "{}", path.display());
            Mapping::parse(&text).unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
        }
    }

    #[test]
    fn postgres_examples_conform_to_their_schema_and_parse() {
        let schema = include_str!("../../../schemas/postgres/mapping.schema.json");
        for entry in
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/postgres/examples")).unwrap()
        {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(schema_errors_for(schema, &text), Vec::<String>::new(), "{}", path.display());
            crate::targets::postgres::mapping::PgMapping::parse(&text)
                .unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
            for (from, to) in [
                ("drop = ", "dorp = "),
                ("op = \"ne\"", "op = \"neq\""),
                ("on_truncate = \"truncate\"", "on_truncate = \"mirror\""),
            ] {
                let broken = text.replacen(from, to, 1);
                assert_ne!(broken, text);
                assert!(!schema_errors_for(schema, &broken).is_empty(), "schema accepts {to}");
                assert!(
                    crate::targets::postgres::mapping::PgMapping::parse(&broken).is_err(),
                    "parser accepts {to}"
                );
            }
        }
    }

    #[test]
    fn the_schema_and_the_parser_reject_the_same_unknown_keys() {
        let example = include_str!("../../../schemas/examples/shop.toml");
        for (from, to) in [
            ("drop = ", "dorp = "),
            ("marker_attribute", "marker"),
            ("as = \"set\"", "as = \"bag\""),
            ("op = \"ne\"", "op = \"neq\""),
        ] {
            let broken = example.replacen(from, to, 1);
            assert_ne!(broken, example);
            assert!(!schema_errors(&broken).is_empty(), "schema accepts {to}");
            assert!(Mapping::parse(&broken).is_err(), "parser accepts {to}");
        }
    }

    #[test]
    fn templates_split_into_literals_and_columns() {
        assert_eq!(
            parse_template("ORDER#{created_at}#{id}").unwrap(),
            vec![
                Segment::Literal("ORDER#".into()),
                Segment::Column("created_at".into()),
                Segment::Literal("#".into()),
                Segment::Column("id".into())
            ]
        );
        assert_eq!(parse_template("PROFILE").unwrap(), vec![Segment::Literal("PROFILE".into())]);
        assert_eq!(parse_template("{{x}}").unwrap(), vec![Segment::Literal("{x}".into())]);
        assert!(parse_template("USER#{id").is_err());
        assert!(parse_template("{}").is_err());
        assert!(parse_template("").is_err());
    }

    #[test]
    fn bad_mapping_names_the_key_and_reason() {
        let problems = Mapping::parse(
            r#"
            [[tables]]
            source = "users"
            target = "app"
            partition_key = { attribute = "pk", template = "USER#{id" }
            rename = { email = "pk" }
            filter = [{ column = "status", op = "eq" }]
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "mapping.tables[0].source",
                "mapping.tables[0].partition_key.template",
                "mapping.tables[0].rename.email",
                "mapping.tables[0].filter[0].value"
            ]
        );
        let problems = Mapping::parse("[[tables]]\nsource = \"public.users\"\ntarget = \"app\"\npartition_key = { attribute = \"pk\", templat = \"x\" }\n").unwrap_err();
        assert!(
            problems[0].key.starts_with("mapping.tables[0].partition_key")
                && problems[0].message.contains("templat"),
            "{problems:?}"
        );
    }
}
