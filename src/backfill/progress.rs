//! The progress table: one row per backfill request (a whole table, or a list of keys), its
//! state and how far it got. `sluice snapshot` and `sluice reconcile` insert requests; the
//! daemon serves them and records progress.
//!
//! A request is addressed to one pipeline by two names: `pipeline` (`pipeline.name`) and
//! `slot` (`source.replication.slot`). The slot is unique in the database, so two pipelines
//! left at the default name never serve each other's requests; rows written before the slot
//! column existed have none, and are served by the same-named pipeline whose publication has
//! the table.

use super::BackfillConfig;

/// Which pipeline a request is for, and what it may serve.
#[derive(Clone, Debug)]
pub struct Scope {
    /// `pipeline.name`.
    pub pipeline: String,
    /// `source.replication.slot`.
    pub slot: String,
    /// `source.replication.publication`: the only tables the pipeline backfills.
    pub publication: String,
}

impl Scope {
    /// The scope of a replication pipeline; `None` for a polled source (nothing to backfill).
    pub fn of(config: &crate::config::Config) -> Option<Scope> {
        let replication = config.source.replication()?;
        Some(Scope {
            pipeline: config.pipeline.name.clone(),
            slot: replication.slot.clone(),
            publication: replication.publication.clone(),
        })
    }
}

/// Creates the progress table when it is missing, and adds the `slot` column to one an
/// older sluice created.
pub async fn ensure_progress_table(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
) -> Result<(), tokio_postgres::Error> {
    sluice_postgres::setup::create_table_if_missing(
        sql,
        &config.quoted_table(),
        "(
           pipeline text NOT NULL,
           slot text,
           id bigint GENERATED ALWAYS AS IDENTITY,
           source_table text NOT NULL,
           keys jsonb,
           state text NOT NULL DEFAULT 'pending' CONSTRAINT sluice_backfill_state_check CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
           last_key text[],
           ranges jsonb,
           rows_done bigint NOT NULL DEFAULT 0,
           chunks_done bigint NOT NULL DEFAULT 0,
           chunk_rows_durable bigint NOT NULL DEFAULT 0,
           rows_estimate bigint,
           error text,
           requested_at timestamptz NOT NULL DEFAULT now(),
           started_at timestamptz,
           finished_at timestamptz,
           PRIMARY KEY (pipeline, id))",
    )
    .await?;
    // A table of an older sluice: the columns added since.
    let columns: Vec<String> = sql
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&config.progress_table.schema(), &config.progress_table.name()],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for (column, definition) in
        [("slot", "text"), ("chunk_rows_durable", "bigint NOT NULL DEFAULT 0"), ("ranges", "jsonb")]
    {
        if !columns.iter().any(|c| c == column) {
            sql.batch_execute(&format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {column} {definition}",
                config.quoted_table()
            ))
            .await?;
        }
    }
    // A table of an older sluice: its state check lacks 'cancelled'.
    let old_check = sql
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'c' \
               AND pg_catalog.pg_get_constraintdef(oid) LIKE '%state%' AND pg_catalog.pg_get_constraintdef(oid) NOT LIKE '%cancelled%'",
            &[&config.quoted_table()],
        )
        .await?;
    if old_check.is_some() {
        sql.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('sluice-progress-table')); \
             ALTER TABLE {t} DROP CONSTRAINT IF EXISTS sluice_backfill_state_check; \
             ALTER TABLE {t} ADD CONSTRAINT sluice_backfill_state_check CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')); COMMIT",
            t = config.quoted_table()
        ))
        .await?;
    }
    Ok(())
}

/// Inserts a request for `table` (every row, or the listed keys as text in key order);
/// returns its id.
pub async fn request(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    scope: &Scope,
    table: &str,
    keys: Option<&[Vec<String>]>,
) -> Result<i64, tokio_postgres::Error> {
    let estimate = match keys {
        Some(keys) => Some(keys.len() as i64),
        None => estimate_rows(sql, table).await?,
    };
    let keys: Option<String> = keys.map(|k| serde_json::to_string(k).unwrap_or_default());
    let row = sql
        .query_one(
            &format!(
                "INSERT INTO {} (pipeline, slot, source_table, keys, rows_estimate) \
                 VALUES ($1, $5, $2, $3::text::jsonb, $4) RETURNING id",
                config.quoted_table()
            ),
            &[&scope.pipeline, &table, &keys, &estimate, &scope.slot],
        )
        .await?;
    Ok(row.get(0))
}

/// Pages up to which a table is counted exactly when it was never analyzed (8 MB).
const EXACT_COUNT_PAGES: i64 = 1000;

/// How many rows `table` (`schema.table`) has, roughly: the planner's estimate (`reltuples`)
/// once ANALYZE or VACUUM has run; before that, an exact count of a small table, or a count of
/// a 1% sample of a larger one's pages. `None` for a table that does not exist.
pub async fn estimate_rows(
    sql: &tokio_postgres::Client,
    table: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(table_size(sql, table).await?.map(|(rows, _)| rows))
}

/// `estimate_rows` and the table's pages (its main fork's size in blocks).
pub(super) async fn table_size(
    sql: &tokio_postgres::Client,
    table: &str,
) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
    let (schema, name) = sluice_postgres::catalog::split_table(table).unwrap_or(("", table));
    let Some(row) = sql
        .query_opt(
            "SELECT c.reltuples::float8, pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::int8, \
                    format('%I.%I', n.nspname, c.relname) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await?
    else {
        return Ok(None);
    };
    let (reltuples, pages, quoted): (f64, i64, String) = (row.get(0), row.get(1), row.get(2));
    if reltuples > 0.0 {
        return Ok(Some((reltuples as i64, pages)));
    }
    let count = if pages <= EXACT_COUNT_PAGES {
        format!("SELECT count(*) FROM {quoted}")
    } else {
        format!("SELECT count(*) * 100 FROM {quoted} TABLESAMPLE SYSTEM (1)")
    };
    Ok(Some((sql.query_one(&count, &[]).await?.get(0), pages)))
}

/// One request as the progress table holds it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Progress {
    /// The request's id.
    pub id: i64,
    /// The table, `schema.table`.
    pub table: String,
    /// `pending`, `running`, `done`, `failed` or `cancelled`.
    pub state: String,
    /// Rows (or keys) of whole chunks made durable so far (the resumable position).
    pub rows_done: i64,
    /// Rows of the chunks in flight already durable (progress within a chunk).
    pub chunk_rows_durable: i64,
    /// Chunks made durable so far.
    pub chunks_done: i64,
    /// The table's estimated rows (`estimate_rows`), or the number of keys.
    pub rows_estimate: Option<i64>,
    /// Why the request failed.
    pub error: Option<String>,
}

/// The requests of `pipeline` with these ids.
pub async fn progress(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    pipeline: &str,
    ids: &[i64],
) -> Result<Vec<Progress>, tokio_postgres::Error> {
    let rows = sql
        .query(
            &format!(
                "SELECT id, source_table, state, rows_done, chunks_done, rows_estimate, error, chunk_rows_durable FROM {} WHERE pipeline = $1 AND id = ANY($2) ORDER BY id",
                config.quoted_table()
            ),
            &[&pipeline, &ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Progress {
            id: r.get(0),
            table: r.get(1),
            state: r.get(2),
            rows_done: r.get(3),
            chunks_done: r.get(4),
            rows_estimate: r.get(5),
            error: r.get(6),
            chunk_rows_durable: r.get(7),
        })
        .collect())
}

/// The publication's tables (`schema.table`), the progress table aside.
pub(crate) async fn published_tables(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    publication: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut tables = sluice_postgres::catalog::publication_tables(sql, publication).await?;
    tables.retain(|table| config.progress_table != *table.as_str());
    Ok(tables)
}
