//! Checks of a mapping against the live Postgres catalog, for `sluice validate`: mapped tables
//! exist and are published, every named column exists, key template columns belong to the
//! replica identity (or the identity is FULL), and type rules fit the column types.

use sluice_core::Problem;
use tokio_postgres::Client;

use super::mapping::{parse_template, AttrKind, Mapping, Segment};

struct CatalogColumn {
    name: String,
    type_name: String,
    category: String,
    identity: bool,
}

/// Every problem of `mapping` against the database behind `sql`, with dotted keys.
pub async fn check(
    sql: &Client,
    mapping: &Mapping,
    publication: &str,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for (i, table) in mapping.tables.iter().enumerate() {
        let prefix = format!("target.mapping.tables[{i}]");
        let Some((schema, name)) = table.source.split_once('.') else { continue };
        let relation = sql
            .query_opt(
                "SELECT c.oid::int8, c.relreplident::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &name],
            )
            .await?;
        let Some(relation) = relation else {
            problems.push(Problem::new(&prefix, "source", format!("table {} does not exist", table.source)));
            continue;
        };
        let oid: i64 = relation.get(0);
        let identity: String = relation.get(1);
        let published = sql
            .query_opt("SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3", &[&publication, &schema, &name])
            .await?
            .is_some();
        if !published {
            problems.push(Problem::new(
                &prefix,
                "source",
                format!("table {} is not in publication {publication:?}", table.source),
            ));
        }
        let columns: Vec<CatalogColumn> = sql
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typcategory::text, \
                        ($2 = 'f') OR EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid \
                          AND a.attnum = ANY(i.indkey) AND (($2 = 'd' AND i.indisprimary) OR ($2 = 'i' AND i.indisreplident))) \
                 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&oid, &identity],
            )
            .await?
            .iter()
            .map(|row| CatalogColumn { name: row.get(0), type_name: row.get(1), category: row.get(2), identity: row.get(3) })
            .collect();
        let find = |column: &str| columns.iter().find(|c| c.name == column);
        let require = |key: String, column: &str, problems: &mut Vec<Problem>| {
            if find(column).is_none() {
                problems.push(Problem::new(
                    &prefix,
                    &key,
                    format!("column {column} does not exist in {}", table.source),
                ));
            }
        };
        for (key_name, key) in
            [("partition_key", Some(&table.partition_key)), ("sort_key", table.sort_key.as_ref())]
        {
            let Some(key) = key else { continue };
            let Ok(segments) = parse_template(&key.template) else { continue };
            for segment in segments {
                let Segment::Column(column) = segment else { continue };
                match find(&column) {
                    None => require(format!("{key_name}.template"), &column, &mut problems),
                    Some(c) if !c.identity => problems.push(Problem::new(
                        &prefix,
                        &format!("{key_name}.template"),
                        format!(
                            "column {column} is not part of the replica identity of {}: an update that changes it would leave the old item behind; \
                             use identity columns in the template, add it to the primary key, or set REPLICA IDENTITY FULL",
                            table.source
                        ),
                    )),
                    Some(_) => {}
                }
            }
        }
        for column in table.rename.keys() {
            require(format!("rename.{column}"), column, &mut problems);
        }
        for column in &table.drop {
            require("drop".into(), column, &mut problems);
        }
        for (j, predicate) in table.filter.iter().enumerate() {
            require(format!("filter[{j}].column"), &predicate.column, &mut problems);
        }
        for (column, rule) in &table.columns {
            let Some(c) = find(column) else {
                require(format!("columns.{column}"), column, &mut problems);
                continue;
            };
            let Some(kind) = rule.as_ else { continue };
            let temporal = ["date", "timestamp without time zone", "timestamp with time zone"]
                .iter()
                .any(|t| c.type_name.starts_with(t));
            let fits = match kind {
                AttrKind::String => true,
                AttrKind::Number => c.category == "N",
                AttrKind::Iso8601 | AttrKind::EpochMillis => temporal,
                AttrKind::Map => c.type_name == "json" || c.type_name == "jsonb",
                AttrKind::List | AttrKind::Set => c.category == "A",
            };
            if !fits {
                problems.push(Problem::new(
                    &prefix,
                    &format!("columns.{column}.as"),
                    format!("{kind:?} does not fit column {column} of type {}", c.type_name),
                ));
            }
        }
    }
    Ok(problems)
}
