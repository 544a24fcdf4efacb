//! Table names, `schema.table`, checked once when they are read (a configuration key, a
//! request) instead of split wherever they are used.

use std::fmt;
use std::str::FromStr;

use crate::event::Relation;

/// A table named by its schema and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    schema: String,
    name: String,
}

impl TableName {
    /// The table `name` in `schema`.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName { schema: schema.into(), name: name.into() }
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table's name within its schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `"schema"."name"`, quoted for SQL whatever characters the names hold.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }

    /// True when `relation` is this table.
    pub fn is(&self, relation: &Relation) -> bool {
        relation.namespace == self.schema && relation.name == self.name
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Why text is not a table name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("must be schema.table")]
pub struct NotATableName;

impl FromStr for TableName {
    type Err = NotATableName;

    /// `schema.table`: the schema ends at the first dot; neither part may be empty.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('.') {
            Some((schema, name)) if !schema.is_empty() && !name.is_empty() => {
                Ok(TableName::new(schema, name))
            }
            _ => Err(NotATableName),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl schemars::JsonSchema for TableName {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TableName".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^[^.]+\\..+$", "description": "schema.table" })
    }
}

impl<'de> serde::Deserialize<'de> for TableName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl PartialEq<str> for TableName {
    fn eq(&self, other: &str) -> bool {
        other.split_once('.') == Some((self.schema.as_str(), self.name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_name_is_schema_dot_table_and_prints_back_the_same() {
        let table: TableName = "public.orders".parse().unwrap();
        assert_eq!((table.schema(), table.name()), ("public", "orders"));
        assert_eq!(table.to_string(), "public.orders");
        assert!(table == *"public.orders");
        for bad in ["orders", ".orders", "public.", ""] {
            assert_eq!(bad.parse::<TableName>(), Err(NotATableName), "{bad:?}");
        }
        // The schema ends at the first dot; the rest is the name.
        let dotted: TableName = "app.v1.orders".parse().unwrap();
        assert_eq!((dotted.schema(), dotted.name()), ("app", "v1.orders"));
        assert_eq!(TableName::new("we\"ird", "t").quoted(), "\"we\"\"ird\".\"t\"");
    }
}
