//! `sluice validate` beyond the files: the source database can serve the pipeline (the same
//! checks `run` makes before streaming) and the mapping fits its catalog.

use sluice_core::Classify;
use sluice_core::Problem;

use crate::config::Config;
use crate::targets::dynamodb::mapping::Mapping;
use crate::targets::postgres::mapping::PgMapping;
use crate::targets::TargetConfig;
use crate::translate::mapping::MappingFile;

/// Problems found in the database; `Err` when the database cannot be asked.
pub async fn against_database(config: &Config) -> Result<Vec<Problem>, sluice_postgres::Error> {
    let source = &config.source;
    let sql = sluice_postgres::connect_sql(&source.connection).await?;
    let mut problems = Vec::new();
    if let Some(replication) = source.replication() {
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
    if let Some(poll) = source.poll() {
        match sluice_postgres::poll::load_relation(&sql, poll).await {
            Ok(_) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => problems.push(Problem::new("source", "poll", e.to_string())),
        }
    }
    let publication = source.replication().map(|r| r.publication.as_str());
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
            problems.extend(
                crate::targets::postgres::check::check(
                    &sql,
                    &config.source.connection,
                    pg,
                    &mapping,
                    publication,
                )
                .await?,
            );
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
    let (schema, name) = (table.schema(), table.name());
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
