//! A table as the catalog describes it, for the readers that query tables directly (the
//! polling source, the backfill, verify) rather than receive Relation messages: the same
//! `Relation` the stream would carry, with the primary key marking the key columns.

use crate::error::{Error, Result};
use crate::event::{Column, Relation, ReplicaIdentity};
use crate::types::TypeRegistry;

/// A table read from the catalog.
#[derive(Clone, Debug)]
pub struct Table {
    pub relation: Relation,
    /// Indexes into `relation.columns` of the primary key, in the key's order; empty when the
    /// table has none.
    pub primary_key: Vec<usize>,
    /// Each column's SQL type (`format_type`), for casting text parameters.
    pub sql_types: Vec<String>,
}

impl Table {
    /// `schema.table`, quoted for SQL.
    pub fn quoted_name(&self) -> String {
        format!("{}.{}", crate::setup::quote_ident(&self.relation.namespace), crate::setup::quote_ident(&self.relation.name))
    }
}

/// Splits `schema.table`.
pub fn split_table(table: &str) -> Option<(&str, &str)> {
    table.split_once('.').filter(|(schema, name)| !schema.is_empty() && !name.is_empty())
}

/// Reads `schema.table` from the catalog; `Ok(None)` when there is no such table.
pub async fn table(sql: &tokio_postgres::Client, schema: &str, name: &str) -> Result<Option<Table>> {
    let rows = sql
        .query(
            "SELECT c.oid::int8, a.attname::text, a.atttypid::int8, a.atttypmod, \
                    array_position(i.indkey::int2[], a.attnum), format_type(a.atttypid, a.atttypmod) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut types = TypeRegistry::new();
    let oids: Vec<u32> = rows.iter().map(|r| r.get::<_, i64>(2) as u32).collect();
    // Element and base types lead to further catalog rows: ask until nothing is missing.
    for _ in 0..8 {
        let missing = types.missing(oids.iter().copied());
        if missing.is_empty() {
            break;
        }
        let found = crate::types::catalog_types(sql, &missing).await?;
        if found.is_empty() {
            break;
        }
        types.add_catalog_rows(found);
    }
    let mut key_positions: Vec<(i32, usize)> = Vec::new();
    let mut sql_types = Vec::with_capacity(rows.len());
    let columns: Vec<Column> = rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let type_oid = row.get::<_, i64>(2) as u32;
            let key_position: Option<i32> = row.get(4);
            if let Some(position) = key_position {
                key_positions.push((position, index));
            }
            sql_types.push(row.get(5));
            Column { name: row.get(1), type_oid, type_modifier: row.get(3), is_key: key_position.is_some(), kind: types.resolve(type_oid) }
        })
        .collect();
    key_positions.sort();
    let relation =
        Relation { oid: rows[0].get::<_, i64>(0) as u32, namespace: schema.to_owned(), name: name.to_owned(), replica_identity: ReplicaIdentity::Default, columns };
    Ok(Some(Table { relation, primary_key: key_positions.into_iter().map(|(_, index)| index).collect(), sql_types }))
}

/// Like `table`, with a missing table as an error naming `key` (the configuration key).
pub async fn required_table(sql: &tokio_postgres::Client, qualified: &str, key: &str) -> Result<Table> {
    let (schema, name) = split_table(qualified).ok_or_else(|| Error::Setup(format!("{key}: {qualified:?} must be schema.table")))?;
    table(sql, schema, name).await?.ok_or_else(|| Error::Setup(format!("{key}: table {qualified} does not exist")))
}
