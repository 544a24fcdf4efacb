//! The target tables as the target's catalog describes them (quoted name, primary key, column
//! types), the sequences their columns own, and a value rendered as a literal of a column's type.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use sluice_postgres::catalog::{quote_literal, required_table};

use super::error::{fatal, sql_error, TARGET};
use super::mapping::PgMapping;
use super::translate::Text;
use crate::error::{ErrorKind, TargetError};

/// A target table as the catalog describes it.
pub(crate) struct TargetTable {
    pub quoted: String,
    /// Column → SQL type, for casts.
    pub types: HashMap<String, String>,
    /// The primary key's columns, in key order.
    pub key: Vec<String>,
    pub table: sluice_postgres::catalog::Table,
}

/// Reads every target table of `mapping` from the target catalog, and checks that each has a
/// primary key and every column the mapping names.
pub(crate) async fn target_tables(
    client: &tokio_postgres::Client,
    mapping: &PgMapping,
) -> Result<HashMap<Arc<str>, TargetTable>, TargetError> {
    let mut tables: HashMap<Arc<str>, TargetTable> = HashMap::new();
    for (i, table) in mapping.tables.iter().enumerate() {
        if tables.contains_key(table.target.as_str()) {
            continue;
        }
        let found =
            target_table(client, &table.target, &format!("target.mapping tables[{i}].target")).await?;
        tables.insert(Arc::from(table.target.as_str()), found);
    }
    for table in &mapping.tables {
        let target = &tables[table.target.as_str()];
        for name in table.rename.values().chain(table.constants.keys()) {
            if !target.types.contains_key(name) {
                return Err(fatal(format!(
                    "target table {} has no column {name} (mapped from {})",
                    table.target, table.source
                )));
            }
        }
    }
    Ok(tables)
}

/// One table as the catalog describes it; a missing table, or one without a primary key, is an
/// error naming it and the configuration key `key`.
pub(crate) async fn target_table(
    client: &tokio_postgres::Client,
    qualified: &str,
    key: &str,
) -> Result<TargetTable, TargetError> {
    let found = required_table(client, qualified, key).await.map_err(|e| TargetError {
        target: TARGET,
        kind: ErrorKind::Fatal,
        message: "cannot read the target table".into(),
        source: Some(Box::new(e)),
    })?;
    if found.primary_key.is_empty() {
        return Err(fatal(format!(
            "target table {qualified} has no primary key: rows are upserted and deleted by it"
        )));
    }
    let columns = &found.relation.columns;
    let key: Vec<String> = found.primary_key.iter().map(|&i| columns[i].name.clone()).collect();
    let types = columns.iter().zip(&found.sql_types).map(|(c, t)| (c.name.clone(), t.clone())).collect();
    Ok(TargetTable { quoted: found.quoted_name(), types, key, table: found })
}

/// Each target table's primary key columns, for the translator.
pub(crate) fn target_keys(tables: &HashMap<Arc<str>, TargetTable>) -> HashMap<String, Vec<String>> {
    tables.iter().map(|(name, t)| (name.to_string(), t.key.clone())).collect()
}

/// A sequence that fills a target column (serial or identity), advanced as rows are written.
pub(crate) struct OwnedSequence {
    pub(crate) column: String,
    /// The sequence's qualified, quoted name.
    pub(crate) quoted: String,
}

/// The sequences owned by the target tables' columns (ascending ones: a descending sequence
/// has no "past the highest value"). The role must be able to read and set each one.
pub(crate) async fn owned_sequences(
    client: &tokio_postgres::Client,
    tables: &HashMap<Arc<str>, TargetTable>,
) -> Result<HashMap<Arc<str>, Vec<OwnedSequence>>, TargetError> {
    let query = "SELECT a.attname, quote_ident(n.nspname) || '.' || quote_ident(c.relname),                         has_sequence_privilege(c.oid, 'SELECT') AND has_sequence_privilege(c.oid, 'UPDATE')                  FROM pg_attribute a                  JOIN pg_depend d ON d.refobjid = a.attrelid AND d.refobjsubid = a.attnum AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')                  JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S'                  JOIN pg_namespace n ON n.oid = c.relnamespace                  JOIN pg_sequence s ON s.seqrelid = c.oid                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped AND s.seqincrement > 0";
    let mut owned = HashMap::new();
    for (name, table) in tables {
        let rows = client
            .query(query, &[&table.quoted])
            .await
            .map_err(|e| sql_error(&format!("cannot read the sequences of target table {name}"), e))?;
        let mut sequences = Vec::new();
        for row in rows {
            let (column, quoted, allowed): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
            if !allowed {
                return Err(fatal(format!(
                    "target sequence {quoted} (of {name}.{column}): the target role cannot read and set it; grant SELECT, UPDATE on it, or set target.sync_sequences = false"
                )));
            }
            sequences.push(OwnedSequence { column, quoted });
        }
        if !sequences.is_empty() {
            owned.insert(Arc::clone(name), sequences);
        }
    }
    Ok(owned)
}

impl TargetTable {
    /// Appends the values of `columns`, comma-separated, each cast to its column's type.
    pub(crate) fn values(&self, columns: &[(String, Text)], sql: &mut String) -> Result<(), TargetError> {
        for (n, (name, text)) in columns.iter().enumerate() {
            if n > 0 {
                sql.push_str(", ");
            }
            self.value(name, text, sql)?;
        }
        Ok(())
    }

    /// Appends a value for `column` as a literal cast to the column's type.
    pub(crate) fn value(&self, column: &str, text: &Text, sql: &mut String) -> Result<(), TargetError> {
        let sql_type = self
            .types
            .get(column)
            .ok_or_else(|| fatal(format!("target table {} has no column {column}", self.quoted)))?;
        match text {
            Some(text) => {
                let _ = write!(sql, "CAST({} AS {sql_type})", quote_literal(text));
            }
            None => {
                let _ = write!(sql, "CAST(NULL AS {sql_type})");
            }
        }
        Ok(())
    }
}
