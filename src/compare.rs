//! The comparison model of `sluice verify` and `sluice reconcile`, shared by the command
//! (`verify/`) and each target's side of it (`targets/<name>/verify.rs`): what a key is found
//! to be, the report, and a source row's key.

use crate::error::CommandError;
use std::collections::BTreeMap;

use serde::Serialize;
use sluice_core::{ChangeEvent, Position, Value};
use sluice_postgres::catalog::Table;

/// A source key: the primary key's values as text, by column.
pub type SourceKey = BTreeMap<String, String>;

/// Differing attributes' values: (from the source through the mapping, stored in the target).
pub type DifferentValues = BTreeMap<String, (Option<String>, Option<String>)>;

/// A key whose target row or item differs from what the source row maps to.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    /// The source row's primary key, column by column.
    pub key: SourceKey,
    /// The attributes (or columns) that differ.
    pub attributes: Vec<String>,
    /// Their values, when `--values` asked for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<DifferentValues>,
    /// Why it differs, when more than values tell (an item without its version attribute).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Items of a target table that no mapping of this pipeline could produce (no key template
/// fits their key): another writer's, in a shared single-table design. Reported apart, never
/// as differences.
#[derive(Clone, Debug, Serialize)]
pub struct Foreign {
    /// The target table.
    pub target: String,
    /// How many such items the scan found.
    pub items: u64,
    /// The first ones' keys.
    pub keys: Vec<BTreeMap<String, String>>,
}

/// A target row or item that no source row produces.
#[derive(Clone, Debug, Serialize)]
pub struct Extra {
    /// The item's key.
    pub item_key: BTreeMap<String, String>,
    /// The source key the item's key templates lead back to, when they do.
    pub source_key: Option<SourceKey>,
}

/// What verify found for one source table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TableReport {
    /// The source table, `schema.table`.
    pub table: String,
    /// The target table it maps to.
    pub target: String,
    /// Rows read.
    pub rows: u64,
    /// Rows whose target row or item is as the mapping makes it.
    pub matched: u64,
    /// Rows without their target row or item.
    pub missing: u64,
    /// Rows whose target row or item differs.
    pub different: u64,
    /// Target rows or items no row produces.
    pub extra: u64,
    /// Rows the mapping cannot translate (the stream dead-letters them).
    pub untranslatable: u64,
    /// The first missing keys.
    pub missing_keys: Vec<SourceKey>,
    /// The first differing keys.
    pub different_keys: Vec<Difference>,
    /// The first extra rows or items.
    pub extra_keys: Vec<Extra>,
    /// Whether extra items were looked for (the whole DynamoDB table was covered).
    pub extra_checked: bool,
}

/// A whole verify report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// One report per source table.
    pub tables: Vec<TableReport>,
    /// The pass's read rate.
    pub rows_per_second: f64,
    /// How long the pass took.
    pub seconds: f64,
    /// Whether the keys found wrong were checked again after the stream passed the pass's end.
    pub rechecked: bool,
    /// Why the re-check did not run, when it did not.
    pub recheck_note: Option<String>,
    /// Other writers' items, per target table (DynamoDB).
    pub foreign: Vec<Foreign>,
}

impl Report {
    /// Missing, different and extra keys over all tables.
    pub fn differences(&self) -> u64 {
        self.tables.iter().map(|t| t.missing + t.different + t.extra).sum()
    }
}

/// What one key is found to be.
pub enum Finding {
    Matched,
    Missing,
    Different(Vec<String>, DifferentValues),
    /// The item lacks its version attribute (written around sluice): the position guard keeps
    /// every write of sluice's from it; `reconcile --force` rewrites it.
    Unversioned(Vec<String>, DifferentValues),
    /// Filtered out by the mapping: no item expected.
    NotExpected,
    Untranslatable,
}

pub fn decode_row(table: &Table, row: &tokio_postgres::Row) -> Result<Vec<Value>, CommandError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in table.relation.columns.iter().enumerate() {
        values.push(
            column.decode_text(row.get(i)).map_err(|e| {
                CommandError::invalid(format!("table {}: {e}", table.relation.qualified_name()))
            })?,
        );
    }
    Ok(values)
}

/// A row read from the source as the stream would carry it: a snapshot insert, for a target's
/// translator to say what the target must hold for it.
pub(crate) fn as_snapshot_insert(table: &Table, row: Vec<Value>) -> ChangeEvent {
    ChangeEvent::Insert {
        position: Position::default(),
        relation: std::sync::Arc::new(table.relation.clone()),
        new: row,
        snapshot: true,
    }
}

/// A row's primary key as text (the values' Postgres text form, which casts back exactly).
pub fn source_key(table: &Table, row: &[Value]) -> SourceKey {
    table.primary_key.iter().map(|&i| (table.relation.columns[i].name.clone(), pg_text(&row[i]))).collect()
}

pub fn pg_text(value: &Value) -> String {
    match value {
        Value::Text(s) | Value::Enum(s) | Value::Json(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A 128-bit digest of a key's text.
pub fn digest(text: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let mut high = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut high);
    let mut low = std::collections::hash_map::DefaultHasher::new();
    "sluice-verify".hash(&mut low);
    text.hash(&mut low);
    ((high.finish() as u128) << 64) | low.finish() as u128
}

/// A key's identity as text: each column name and value length-prefixed, so that no two
/// different keys read the same.
pub fn key_identity(key: &BTreeMap<String, String>) -> String {
    let mut text = String::new();
    for (name, value) in key {
        text.push_str(&format!("{}:{name}{}:{value}", name.len(), value.len()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_identities_of_different_keys_differ() {
        let key = |pairs: &[(&str, &str)]| -> SourceKey {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_ne!(
            key_identity(&key(&[("a", "1:b"), ("c", "")])),
            key_identity(&key(&[("a", "1"), ("b:c", "")]))
        );
        assert_eq!(key_identity(&key(&[("id", "7")])), key_identity(&key(&[("id", "7")])));
        assert_ne!(digest(&key_identity(&key(&[("id", "7")]))), digest(&key_identity(&key(&[("id", "8")]))));
    }
}
