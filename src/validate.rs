//! `sluice validate` beyond the files: the source database can serve the pipeline (the same
//! checks `run` makes before streaming) and the mapping fits its catalog.

use sluice_core::Problem;

use sluice_postgres::catalog;

use crate::config::Config;
use crate::targets::dynamodb::mapping::Mapping;
use crate::targets::postgres::apply::{owned_sequences, target_keys, target_tables};
use crate::targets::postgres::config::PostgresTargetConfig;
use crate::targets::postgres::mapping::PgMapping;
use crate::targets::postgres::translate::PgTranslator;
use crate::targets::TargetConfig;

/// Problems found in the database; `Err` when the database cannot be asked.
pub async fn against_database(config: &Config) -> Result<Vec<Problem>, sluice_postgres::Error> {
    let source = &config.source;
    let sql = sluice_postgres::connect_sql(&source.connection).await?;
    let mut problems = Vec::new();
    if let Some(replication) = &source.replication {
        match sluice_postgres::setup::check(&sql, &source.connection, replication).await {
            Ok(_) | Err(sluice_postgres::Error::SlotInUse { .. }) => {}
            Err(e) => problems.push(Problem::new("source", "replication", e.to_string())),
        }
        for warning in sluice_postgres::setup::identity_warnings(&sql, &replication.publication).await? {
            problems.push(Problem::new(
                "source.replication",
                "publication",
                format!("table {}: {}", warning.table, warning.reason),
            ));
        }
    }
    if let Some(poll) = &source.poll {
        match sluice_postgres::poll::load_relation(&sql, poll).await {
            Ok(_) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => problems.push(Problem::new("source", "poll", e.to_string())),
        }
    }
    let publication = source.replication.as_ref().map(|r| r.publication.as_str());
    if let Some(outbox) = config.target.outbox() {
        problems.extend(outbox_table(&sql, outbox, publication).await?);
    }
    if let (TargetConfig::Dynamodb(dynamo), Some(publication)) = (&config.target, publication) {
        if let Some(Ok(mapping)) = dynamo.mapping.as_deref().map(Mapping::load) {
            problems.extend(crate::targets::dynamodb::check::check(&sql, &mapping, publication).await?);
        }
    }
    if let (TargetConfig::Postgres(pg), Some(publication)) = (&config.target, publication) {
        if let Ok(mapping) = PgMapping::load(&pg.mapping) {
            problems.extend(postgres_target(&sql, config, pg, &mapping, publication).await?);
        }
    }
    Ok(problems)
}

/// A Postgres target's mapping against both catalogs: the source tables exist, are published
/// and have the columns the mapping names; the target tables exist with a primary key and
/// every column the mapping writes, and no NOT NULL column without a default is left unwritten;
/// and, in the source's own database, sluice's writes are not published back into the stream.
async fn postgres_target(
    sql: &tokio_postgres::Client,
    config: &Config,
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
    let source = &config.source.connection;
    let same_database = (&pg.connection.host, pg.connection.port, &pg.connection.dbname)
        == (&source.host, source.port, &source.dbname);
    if same_database {
        for looped in tables
            .keys()
            .map(|t| t.to_string())
            .chain([pg.checkpoint_table.clone()])
            .filter(|t| published.contains(t))
        {
            problems.push(Problem::new("target", "mapping", format!("table {looped} is written by sluice and published in {publication:?}: its changes would stream back")));
        }
    }
    Ok(problems)
}

/// The outbox table exists, is published (when streamed from a publication), and has the
/// router's columns.
async fn outbox_table(
    sql: &tokio_postgres::Client,
    outbox: &crate::translate::outbox::OutboxConfig,
    publication: Option<&str>,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    let Some(table) = &outbox.table else { return Ok(problems) };
    let Some((schema, name)) = table.split_once('.') else {
        problems.push(Problem::new("target.outbox", "table", format!("{table:?} must be schema.table")));
        return Ok(problems);
    };
    let columns: Vec<String> = sql
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &name],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if columns.is_empty() {
        problems.push(Problem::new("target.outbox", "table", format!("table {table} does not exist")));
        return Ok(problems);
    }
    if let Some(publication) = publication {
        let published = sql
            .query_opt("SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3", &[&publication, &schema, &name])
            .await?
            .is_some();
        if !published {
            problems.push(Problem::new(
                "target.outbox",
                "table",
                format!("table {table} is not in publication {publication:?}"),
            ));
        }
    }
    let required = [
        ("aggregate_type_column", &outbox.aggregate_type_column),
        ("aggregate_id_column", &outbox.aggregate_id_column),
        ("payload_column", &outbox.payload_column),
        ("id_column", &outbox.id_column),
    ];
    for (key, column) in required {
        if !columns.contains(column) {
            problems.push(Problem::new(
                "target.outbox",
                key,
                format!("table {table} has no column {column:?}"),
            ));
        }
    }
    for column in &outbox.header_columns {
        if !columns.contains(column) {
            problems.push(Problem::new(
                "target.outbox",
                "header_columns",
                format!("table {table} has no column {column:?}"),
            ));
        }
    }
    Ok(problems)
}
