//! A table as the catalog describes it, for the readers that query tables directly (the
//! polling source, the backfill, verify) rather than receive Relation messages: the same
//! `Relation` the stream would carry, with the primary key marking the key columns.

use crate::error::{Error, Result};
use crate::setup::quote_ident;
use crate::types::TypeRegistry;
use sluice_core::event::{Column, Relation, ReplicaIdentity};

/// A table read from the catalog.
#[derive(Clone, Debug)]
pub struct Table {
    /// The table's columns, as a change event's relation.
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
        format!("{}.{}", quote_ident(&self.relation.namespace), quote_ident(&self.relation.name))
    }

    /// Every column, from the table aliased `s` in the queries below; each as `::text` when
    /// `as_text`.
    pub fn select_list(&self, as_text: bool) -> String {
        let cast = if as_text { "::text" } else { "" };
        self.relation
            .columns
            .iter()
            .map(|c| format!("s.{}{cast}", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The primary key's columns, qualified: a bare name in ORDER BY would mean an output
    /// column of the same name (a `::text` one, which orders as text).
    fn key_list(&self) -> String {
        self.primary_key
            .iter()
            .map(|&i| format!("s.{}", quote_ident(&self.relation.columns[i].name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The primary key's values given as text, cast to the columns' types, as a row.
    fn key_literal(&self, texts: &[String]) -> String {
        let casts: Vec<String> = self
            .primary_key
            .iter()
            .zip(texts)
            .map(|(&i, text)| format!("CAST({} AS {})", quote_literal(text), self.sql_types[i]))
            .collect();
        format!("({})", casts.join(", "))
    }

    /// The next page of `columns` in primary-key order: `limit` rows after the key `after`
    /// (text values, in key order), that also meet `condition`. Values are written as
    /// literals, so that the query serves COPY too.
    pub fn page_query(
        &self,
        columns: &str,
        after: Option<&[String]>,
        limit: usize,
        condition: Option<&str>,
    ) -> String {
        let keys = self.key_list();
        let mut conditions: Vec<String> = Vec::new();
        if let Some(after) = after {
            conditions.push(format!("({keys}) > {}", self.key_literal(after)));
        }
        conditions.extend(condition.map(str::to_owned));
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        format!("SELECT {columns} FROM {} s{filter} ORDER BY {keys} LIMIT {limit}", self.quoted_name())
    }

    /// The condition that a row's primary key is at most `upto` (text values, in key order),
    /// for `page_query`: the upper end of a key range.
    pub fn key_at_most(&self, upto: &[String]) -> String {
        format!("({}) <= {}", self.key_list(), self.key_literal(upto))
    }

    /// The primary keys (each a text array, in key order) of a sample of about `percent` % of
    /// the table's pages, in key order: where to split the table into key ranges.
    pub fn key_sample_query(&self, percent: f64) -> String {
        format!(
            "SELECT {} FROM {} s TABLESAMPLE SYSTEM ({percent}) ORDER BY {}",
            self.key_text_array(),
            self.quoted_name(),
            self.key_list()
        )
    }

    /// The primary keys (as `key_sample_query` gives them) of the first row of each of the
    /// table's pages `pages`, in key order: one key per page, fetched by its ctid (a TID
    /// scan, no other page read). A page whose first line pointer holds no live row gives none.
    pub fn key_at_pages_query(&self, pages: &[u64]) -> String {
        let tids: Vec<String> = pages.iter().map(|page| format!("\"({page},1)\"")).collect();
        format!(
            "SELECT {} FROM {} s WHERE s.ctid = ANY ('{{{}}}'::tid[]) ORDER BY {}",
            self.key_text_array(),
            self.quoted_name(),
            tids.join(","),
            self.key_list()
        )
    }

    /// `ARRAY[s.<key column>::text, …]`, in key order.
    fn key_text_array(&self) -> String {
        let texts: Vec<String> = self
            .primary_key
            .iter()
            .map(|&i| format!("s.{}::text", quote_ident(&self.relation.columns[i].name)))
            .collect();
        format!("ARRAY[{}]", texts.join(", "))
    }

    /// The rows with these primary keys (text values, in key order); `keys` must not be empty.
    pub fn keys_query(&self, columns: &str, keys: &[Vec<String>]) -> String {
        let rows: Vec<String> = keys.iter().map(|key| self.key_literal(key)).collect();
        format!(
            "SELECT {columns} FROM {} s WHERE ({}) IN (VALUES {})",
            self.quoted_name(),
            self.key_list(),
            rows.join(", ")
        )
    }

    /// A primary key given as text, decoded with the columns' types.
    pub fn decode_key(&self, texts: &[String]) -> Result<Vec<sluice_core::value::Value>, String> {
        if texts.len() != self.primary_key.len() {
            return Err(format!(
                "a key of {} has {} values; the primary key has {}",
                self.relation.qualified_name(),
                texts.len(),
                self.primary_key.len()
            ));
        }
        self.primary_key
            .iter()
            .zip(texts)
            .map(|(&i, text)| {
                let column = &self.relation.columns[i];
                column
                    .kind
                    .decode_text(column.type_oid, text)
                    .map_err(|e| format!("key value for column {}: {}", column.name, e.reason))
            })
            .collect()
    }
}

/// A string literal that reads the same whatever `standard_conforming_strings` says.
pub fn quote_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// Splits `schema.table`.
pub fn split_table(table: &str) -> Option<(&str, &str)> {
    table.split_once('.').filter(|(schema, name)| !schema.is_empty() && !name.is_empty())
}

/// The tables of `publication`, as `schema.table`, in order.
pub async fn publication_tables(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> std::result::Result<Vec<String>, tokio_postgres::Error> {
    Ok(sql
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_catalog.pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
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
            Column {
                name: row.get(1),
                type_oid,
                type_modifier: row.get(3),
                is_key: key_position.is_some(),
                kind: types.resolve(type_oid),
            }
        })
        .collect();
    key_positions.sort();
    let relation = Relation {
        oid: rows[0].get::<_, i64>(0) as u32,
        namespace: schema.to_owned(),
        name: name.to_owned(),
        replica_identity: ReplicaIdentity::Default,
        columns,
    };
    Ok(Some(Table {
        relation,
        primary_key: key_positions.into_iter().map(|(_, index)| index).collect(),
        sql_types,
    }))
}

/// A column of a table that a publication does not carry, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    /// The column's name.
    pub column: String,
    /// Why the stream never carries it, in words.
    pub reason: &'static str,
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "column {} is not carried by the publication: {}", self.column, self.reason)
    }
}

/// The columns of `schema.name` that `publication` does not carry, so that no change event
/// of the stream holds them: generated columns (never before Postgres 18; on 18 stored ones
/// only where the publication sets `publish_generated_columns = stored`, virtual ones never),
/// and those a column list (15+) leaves out. Empty for a table the publication does not include.
pub async fn left_out_columns(
    sql: &tokio_postgres::Client,
    publication: &str,
    schema: &str,
    name: &str,
) -> std::result::Result<Vec<LeftOut>, tokio_postgres::Error> {
    let version: i32 = sql.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    // Before 15, no column lists (and no `attnames`): every column but the generated ones.
    let listed: Option<Vec<String>> = if version >= 150000 {
        let Some(row) = sql
            .query_opt(
                "SELECT attnames::text[] FROM pg_catalog.pg_publication_tables \
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &schema, &name],
            )
            .await?
        else {
            return Ok(Vec::new());
        };
        Some(row.get(0))
    } else {
        None
    };
    let rows = sql
        .query(
            "SELECT a.attname::text, a.attgenerated::text FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    let columns: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(left_out(&columns, listed.as_deref(), version))
}

/// `left_out_columns` from the catalog rows: each column's name and `attgenerated`, the
/// publication's `attnames` (15+) and `server_version_num`.
fn left_out(columns: &[(String, String)], listed: Option<&[String]>, version: i32) -> Vec<LeftOut> {
    columns
        .iter()
        .filter_map(|(column, generated)| {
            let reason = match generated.as_str() {
                "v" => "it is a virtual generated column, which logical replication never carries",
                "s" if version < 180000 => {
                    "it is a generated column, which Postgres publishes only from 18 (publish_generated_columns = stored)"
                }
                "s" if listed.is_some_and(|l| !l.contains(column)) => {
                    "it is a generated column and the publication does not publish generated columns \
                     (publish_generated_columns = stored, or a column list naming it)"
                }
                _ if listed.is_some_and(|l| !l.contains(column)) => "the publication's column list leaves it out",
                _ => return None,
            };
            Some(LeftOut { column: column.clone(), reason })
        })
        .collect()
}

impl Table {
    /// This table without `columns` (by name): the primary key and the SQL types follow. A
    /// primary-key column among them leaves the table without a primary key.
    pub fn without(mut self, columns: &[LeftOut]) -> Table {
        if columns.is_empty() {
            return self;
        }
        let gone = |name: &str| columns.iter().any(|c| c.column == name);
        let keep: Vec<bool> = self.relation.columns.iter().map(|c| !gone(&c.name)).collect();
        let mut new_index = Vec::with_capacity(keep.len());
        let mut next = 0;
        for &kept in &keep {
            new_index.push(kept.then_some(next));
            next += usize::from(kept);
        }
        let key: Option<Vec<usize>> = self.primary_key.iter().map(|&k| new_index[k]).collect();
        self.primary_key = key.unwrap_or_default();
        let mut kept = keep.iter();
        self.relation.columns.retain(|_| *kept.next().expect("one flag per column"));
        let mut kept = keep.iter();
        self.sql_types.retain(|_| *kept.next().expect("one flag per column"));
        self
    }
}

/// Like `table`, with a missing table as an error naming `key` (the configuration key).
pub async fn required_table(sql: &tokio_postgres::Client, qualified: &str, key: &str) -> Result<Table> {
    let (schema, name) = split_table(qualified)
        .ok_or_else(|| Error::Setup(format!("{key}: {qualified:?} must be schema.table")))?;
    table(sql, schema, name)
        .await?
        .ok_or_else(|| Error::Setup(format!("{key}: table {qualified} does not exist")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::TypeKind;

    fn orders() -> Table {
        let column = |name: &str| Column {
            name: name.into(),
            type_oid: 20,
            type_modifier: -1,
            is_key: name != "total",
            kind: TypeKind::Int8,
        };
        Table {
            relation: Relation {
                oid: 1,
                namespace: "public".into(),
                name: "orders".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![column("customer_id"), column("id"), column("total")],
            },
            primary_key: vec![0, 1],
            sql_types: vec!["bigint".into(), "bigint".into(), "numeric".into()],
        }
    }

    #[test]
    fn page_and_key_queries_order_by_the_qualified_key_and_quote_literals() {
        let table = orders();
        assert_eq!(table.select_list(true), "s.\"customer_id\"::text, s.\"id\"::text, s.\"total\"::text");
        assert_eq!(
            table.page_query("x", Some(&["7".into(), "it's\\".into()]), 10, Some("random() < 0.5")),
            "SELECT x FROM \"public\".\"orders\" s WHERE (s.\"customer_id\", s.\"id\") > (CAST(E'7' AS bigint), CAST(E'it''s\\\\' AS bigint)) \
             AND random() < 0.5 ORDER BY s.\"customer_id\", s.\"id\" LIMIT 10"
        );
        assert_eq!(
            table.page_query("x", None, 5, None),
            "SELECT x FROM \"public\".\"orders\" s ORDER BY s.\"customer_id\", s.\"id\" LIMIT 5"
        );
        assert_eq!(
            table.keys_query("x", &[vec!["1".into(), "2".into()]]),
            "SELECT x FROM \"public\".\"orders\" s WHERE (s.\"customer_id\", s.\"id\") IN (VALUES (CAST(E'1' AS bigint), CAST(E'2' AS bigint)))"
        );
        assert_eq!(
            table.decode_key(&["01".into(), "2".into()]),
            Ok(vec![sluice_core::value::Value::Int8(1), sluice_core::value::Value::Int8(2)])
        );
        assert!(table.decode_key(&["1".into()]).unwrap_err().contains("the primary key has 2"));
    }

    #[test]
    fn left_out_columns_follow_the_version_the_column_list_and_the_kind_of_generation() {
        let columns: Vec<(String, String)> =
            [("id", ""), ("price", ""), ("doubled", "s"), ("tripled", "v"), ("note", "")]
                .iter()
                .map(|(n, g)| (n.to_string(), g.to_string()))
                .collect();
        let names = |left: Vec<LeftOut>| left.into_iter().map(|l| l.column).collect::<Vec<_>>();
        // 14: no column lists; generated columns never published.
        assert_eq!(names(left_out(&columns, None, 140023)), ["doubled", "tripled"]);
        // 15 to 17 list a stored generated column in attnames, but never send it.
        let all: Vec<String> = ["id", "price", "doubled", "note"].map(String::from).to_vec();
        assert_eq!(names(left_out(&columns, Some(&all), 150018)), ["doubled", "tripled"]);
        // 18: attnames is what the stream carries; a stored column published with
        // publish_generated_columns = stored stays.
        assert_eq!(names(left_out(&columns, Some(&all), 180004)), ["tripled"]);
        let without_generated: Vec<String> = ["id", "price", "note"].map(String::from).to_vec();
        let left = left_out(&columns, Some(&without_generated), 180004);
        assert_eq!(names(left.clone()), ["doubled", "tripled"]);
        assert!(left[0].reason.contains("publish_generated_columns"), "{}", left[0]);
        // A column list.
        let listed: Vec<String> = ["id", "price"].map(String::from).to_vec();
        let left = left_out(&columns, Some(&listed), 160010);
        assert_eq!(names(left.clone()), ["doubled", "tripled", "note"]);
        assert_eq!(
            left[2].to_string(),
            "column note is not carried by the publication: the publication's column list leaves it out"
        );
    }

    #[test]
    fn a_table_without_some_columns_keeps_its_key_and_types_in_step() {
        let mut table = orders();
        table.relation.columns.insert(1, table.relation.columns[2].clone());
        table.relation.columns[1].name = "note".into();
        table.sql_types.insert(1, "text".into());
        table.primary_key = vec![0, 2];
        let gone = |c: &str| LeftOut { column: c.into(), reason: "test" };
        let narrowed = table.clone().without(&[gone("note")]);
        let names: Vec<&str> = narrowed.relation.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["customer_id", "id", "total"]);
        assert_eq!(narrowed.primary_key, [0, 1]);
        assert_eq!(narrowed.sql_types, ["bigint", "bigint", "numeric"]);
        let keyless = table.without(&[gone("id")]);
        assert!(keyless.primary_key.is_empty());
        assert_eq!(keyless.relation.columns.len(), 3);
    }
}
