//! The source row a dead-letter entry leads back to: its table and primary key, from the
//! change the entry carries (translation failures), from a DynamoDB key through the mapping's
//! key templates, from a Postgres target's row through the mapping's renames, or from a Kafka
//! record's key (the identity columns as JSON).

use std::collections::HashMap;

use sluice_dynamodb::{Attr, Item};
use sluice_postgres::catalog::Table;
use sluice_postgres::ReadSession;

use crate::config::Config;
use crate::error::{CommandContext, CommandError};
use crate::targets::dynamodb::mapping::Mapping;
use crate::targets::TargetConfig;
use crate::translate::mapping::MappingFile;

/// Finds the keys of entries, reading each source table's catalog once.
pub struct Finder<'a> {
    config: &'a Config,
    tables: HashMap<String, Option<Table>>,
    mapping: Option<Option<Mapping>>,
    pg_mapping: Option<Option<crate::targets::postgres::mapping::PgMapping>>,
}

impl<'a> Finder<'a> {
    pub fn new(config: &'a Config) -> Self {
        Finder { config, tables: HashMap::new(), mapping: None, pg_mapping: None }
    }

    /// The entry's source table and primary key (text, in key order), or why it has none.
    pub async fn key_of(
        &mut self,
        sql: &mut ReadSession,
        entry: &serde_json::Value,
    ) -> Result<Result<(String, Vec<String>), String>, CommandError> {
        let Some(name) = entry["table"].as_str() else { return Ok(Err("the entry names no table".into())) };
        if name.starts_with("message:") {
            return Ok(Err("a logical message has no source row to read again; emit it again".into()));
        }
        if name.contains(',') {
            return Ok(Err("a TRUNCATE is no row; backfill the tables instead".into()));
        }
        if !self.tables.contains_key(name) {
            let found = sql
                .run(async |c| {
                    let Some((schema, table)) = sluice_postgres::catalog::split_table(name) else {
                        return Ok(None);
                    };
                    sluice_postgres::catalog::table(c, schema, table).await
                })
                .await
                .with_context(|| format!("cannot read table {name} from the source catalog"))?;
            self.tables.insert(name.to_owned(), found);
        }
        let Some(table) = &self.tables[name] else {
            return Ok(Err(format!("table {name} no longer exists in the source")));
        };
        if table.primary_key.is_empty() {
            return Ok(Err(format!("table {name} has no primary key, which a keyed backfill needs")));
        }
        let columns: Vec<&str> =
            table.primary_key.iter().map(|&i| table.relation.columns[i].name.as_str()).collect();
        // A change: the new row, or the old one (its key) of a delete.
        if entry["change"].is_object() {
            let change = &entry["change"];
            let row = if change["op"] == "delete" { &change["old"] } else { &change["new"] };
            return Ok(from_json(name, &columns, row));
        }
        // A DynamoDB write: back through the mapping's key templates.
        if let (Some(target_table), Some(key)) = (entry["target_table"].as_str(), entry["key"].as_object()) {
            if let TargetConfig::Dynamodb(dynamo) = &self.config.target {
                let mapping = self
                    .mapping
                    .get_or_insert_with(|| dynamo.mapping.as_deref().and_then(|p| Mapping::load(p).ok()));
                let Some(mapping) = mapping else {
                    return Ok(Err("the mapping (target.mapping) does not load".into()));
                };
                let mut item = dynamo_item(key);
                if let Some(attributes) = entry["item"].as_object() {
                    item.extend(dynamo_item(attributes));
                }
                let found = mapping
                    .tables
                    .iter()
                    .filter(|m| m.source == name && m.target == target_table)
                    .find_map(|m| crate::targets::dynamodb::verify::source_key_of(m, table, &item));
                return Ok(match found {
                    Some(key) => Ok((name.to_owned(), columns.iter().map(|c| key[*c].clone()).collect())),
                    None => Err(format!(
                        "the DynamoDB key leads back to no key of {name} through the mapping's key templates"
                    )),
                });
            }
        }
        // A Postgres target's row: the source key columns under their target names (renames).
        if let (Some(target_table), TargetConfig::Postgres(pg)) =
            (entry["target_table"].as_str(), &self.config.target)
        {
            let mapping = self
                .pg_mapping
                .get_or_insert_with(|| crate::targets::postgres::mapping::PgMapping::load(&pg.mapping).ok());
            let Some(mapping) = mapping else {
                return Ok(Err("the mapping (target.mapping) does not load".into()));
            };
            let Some(table_mapping) =
                mapping.tables.iter().find(|m| m.source == name && m.target == target_table)
            else {
                return Ok(Err(format!("the mapping no longer maps {name} to {target_table}")));
            };
            let mut row = serde_json::Map::new();
            for part in ["row", "key"] {
                if let Some(columns) = entry[part].as_object() {
                    row.extend(columns.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            let renamed: Vec<&str> =
                columns.iter().map(|c| table_mapping.rename.get(*c).map_or(*c, String::as_str)).collect();
            return Ok(from_json(name, &renamed, &serde_json::Value::Object(row)));
        }
        // A Kafka record: its key is the identity columns as a JSON object.
        if let (Some(_topic), Some(key)) = (entry["topic"].as_str(), entry["key"].as_str()) {
            return Ok(match serde_json::from_str::<serde_json::Value>(key) {
                Ok(row) if row.is_object() => from_json(name, &columns, &row),
                _ => Err("the record's key is no JSON object of key columns".into()),
            });
        }
        Ok(Err("the entry carries no key of its source row".into()))
    }
}

/// The key columns' values of a row in the JSON shape of change events.
fn from_json(
    table: &str,
    columns: &[&str],
    row: &serde_json::Value,
) -> Result<(String, Vec<String>), String> {
    let mut key = Vec::with_capacity(columns.len());
    for column in columns {
        let text = match &row[*column] {
            serde_json::Value::Null => {
                return Err(format!("the entry does not carry key column {column} of {table}"))
            }
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        key.push(text);
    }
    Ok((table.to_owned(), key))
}

/// The string and number attributes of DynamoDB JSON (`{"pk": {"S": "…"}}`): all a key
/// template or a renamed key column can hold.
fn dynamo_item(attributes: &serde_json::Map<String, serde_json::Value>) -> Item {
    attributes
        .iter()
        .filter_map(|(name, value)| {
            let attr = match (value["S"].as_str(), value["N"].as_str()) {
                (Some(s), _) => Attr::S(s.to_owned()),
                (None, Some(n)) => Attr::N(n.to_owned()),
                _ => return None,
            };
            Some((name.clone(), attr))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_columns_come_from_the_row_as_text() {
        let row = serde_json::json!({"id": 7, "region": "eu", "name": "x"});
        assert_eq!(
            from_json("public.t", &["region", "id"], &row),
            Ok(("public.t".into(), vec!["eu".into(), "7".into()]))
        );
        assert!(from_json("public.t", &["missing"], &row)
            .unwrap_err()
            .contains("key column missing of public.t"));
    }

    #[test]
    fn dynamodb_json_keeps_strings_and_numbers() {
        let key = serde_json::json!({"pk": {"S": "CUSTOMER#2"}, "n": {"N": "5"}, "b": {"BOOL": true}});
        let item = dynamo_item(key.as_object().unwrap());
        assert_eq!(item.get("pk"), Some(&Attr::S("CUSTOMER#2".into())));
        assert_eq!(item.get("n"), Some(&Attr::N("5".into())));
        assert!(!item.contains_key("b"));
    }
}
