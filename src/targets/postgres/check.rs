//! `sluice validate` for a Postgres target: the mapping against both catalogs.

use sluice_core::Problem;
use sluice_postgres::{catalog, ConnectionConfig};

use super::catalog::{owned_sequences, target_keys, target_tables};
use super::config::PostgresTargetConfig;
use super::mapping::PgMapping;
use super::translate::PgTranslator;

/// A Postgres target's mapping against both catalogs: the source tables exist, are published
/// and have the columns the mapping names; the target tables exist with a primary key and
/// every column the mapping writes, and no NOT NULL column without a default is left unwritten;
/// and, in the source's own database, sluice's writes are not published back into the stream.
pub async fn check(
    sql: &tokio_postgres::Client,
    source: &ConnectionConfig,
    pg: &PostgresTargetConfig,
    mapping: &PgMapping,
    publication: &str,
) -> Result<Vec<Problem>, sluice_postgres::Error> {
    let mut problems = Vec::new();
    let target = match sluice_postgres::connect_sql(&pg.connection).await {
        Ok(client) => client,
        Err(e) => {
            problems.push(Problem::new("target", "connection", e.to_string()));
            return Ok(problems);
        }
    };
    let tables = match target_tables(&target, mapping).await {
        Ok(tables) => tables,
        Err(e) => {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
            problems.push(Problem::new("target", "mapping", format!("{}{cause}", e.message)));
            return Ok(problems);
        }
    };
    let translator = PgTranslator::new(mapping, &target_keys(&tables));
    let published: Vec<String> = sql
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for (i, table) in mapping.tables.iter().enumerate() {
        let prefix = format!("target.mapping.tables[{i}]");
        let (schema, name) = catalog::split_table(&table.source).unwrap_or_default();
        let Some(source) = catalog::table(sql, schema, name).await? else {
            problems.push(Problem::new(&prefix, "source", format!("table {} does not exist", table.source)));
            continue;
        };
        if !published.contains(&table.source) {
            problems.push(Problem::new(
                &prefix,
                "source",
                format!("table {} is not in publication {publication:?}", table.source),
            ));
        }
        let source_columns: Vec<&str> = source.relation.columns.iter().map(|c| c.name.as_str()).collect();
        let named = table
            .rename
            .keys()
            .map(|c| ("rename", c))
            .chain(table.drop.iter().map(|c| ("drop", c)))
            .chain(table.filter.iter().map(|f| ("filter", &f.column)));
        for (key, column) in named {
            if !source_columns.contains(&column.as_str()) {
                problems.push(Problem::new(
                    &prefix,
                    key,
                    format!("column {column} does not exist in {}", table.source),
                ));
            }
        }
        let target_table = &tables[table.target.as_str()];
        let written =
            translator.target_columns(&table.source, source_columns.iter().copied()).unwrap_or_default();
        for column in &written {
            if !target_table.types.contains_key(column) {
                problems.push(Problem::new(
                    &prefix,
                    "target",
                    format!("target table {} has no column {column} (from {})", table.target, table.source),
                ));
            }
        }
        for key in &target_table.key {
            if !written.contains(key) {
                problems.push(Problem::new(
                    &prefix,
                    "target",
                    format!(
                        "target key column {key} of {} is written by no column of {}",
                        table.target, table.source
                    ),
                ));
            }
        }
        let required: Vec<String> = target
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0                  AND NOT a.attisdropped AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''",
                &[&target_table.quoted],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for column in required.iter().filter(|c| !written.contains(c)) {
            problems.push(Problem::new(
                &prefix,
                "target",
                format!(
                    "target column {}.{column} is NOT NULL without a default and written by no column of {}",
                    table.target, table.source
                ),
            ));
        }
    }
    if pg.sync_sequences {
        if let Err(e) = owned_sequences(&target, &tables).await {
            problems.push(Problem::new("target", "sync_sequences", e.message));
        }
    }
    let same_database = (&pg.connection.host, pg.connection.port, &pg.connection.dbname)
        == (&source.host, source.port, &source.dbname);
    if same_database {
        for looped in tables
            .keys()
            .map(|t| t.to_string())
            .chain([pg.checkpoint_table.to_string()])
            .filter(|t| published.contains(t))
        {
            problems.push(Problem::new("target", "mapping", format!("table {looped} is written by sluice and published in {publication:?}: its changes would stream back")));
        }
    }
    Ok(problems)
}
