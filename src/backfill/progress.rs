//! The progress table: one row per backfill request (a whole table, or a list of keys), its
//! state and how far it got. `sluice snapshot` and `sluice reconcile` insert requests; the
//! daemon serves them and records progress.

use super::BackfillConfig;

/// Creates the progress table when it is missing.
pub async fn ensure_progress_table(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
) -> Result<(), tokio_postgres::Error> {
    sluice_postgres::setup::create_table_if_missing(
        sql,
        &config.quoted_table(),
        "(
           pipeline text NOT NULL,
           id bigint GENERATED ALWAYS AS IDENTITY,
           source_table text NOT NULL,
           keys jsonb,
           state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done', 'failed')),
           last_key text[],
           rows_done bigint NOT NULL DEFAULT 0,
           chunks_done bigint NOT NULL DEFAULT 0,
           rows_estimate bigint,
           error text,
           requested_at timestamptz NOT NULL DEFAULT now(),
           started_at timestamptz,
           finished_at timestamptz,
           PRIMARY KEY (pipeline, id))",
    )
    .await
}

/// Inserts a request for `table` (every row, or the listed keys as text in key order);
/// returns its id.
pub async fn request(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    pipeline: &str,
    table: &str,
    keys: Option<&[Vec<String>]>,
) -> Result<i64, tokio_postgres::Error> {
    let keys: Option<String> = keys.map(|k| serde_json::to_string(k).unwrap_or_default());
    let (schema, name) = sluice_postgres::catalog::split_table(table).unwrap_or(("", table));
    let row = sql
        .query_one(
            &format!(
                "INSERT INTO {} (pipeline, source_table, keys, rows_estimate) \
                 SELECT $1, $2, $3::text::jsonb, CASE WHEN $3::text IS NULL THEN \
                   (SELECT greatest(c.reltuples, 0)::int8 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                    WHERE n.nspname = $4 AND c.relname = $5) ELSE jsonb_array_length($3::text::jsonb) END \
                 RETURNING id",
                config.quoted_table()
            ),
            &[&pipeline, &table, &keys, &schema, &name],
        )
        .await?;
    Ok(row.get(0))
}

/// One request as the progress table holds it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Progress {
    /// The request's id.
    pub id: i64,
    /// The table, `schema.table`.
    pub table: String,
    /// `pending`, `running`, `done` or `failed`.
    pub state: String,
    /// Rows (or keys) made durable so far.
    pub rows_done: i64,
    /// Chunks made durable so far.
    pub chunks_done: i64,
    /// The table's estimated rows (`reltuples`), or the number of keys.
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
                "SELECT id, source_table, state, rows_done, chunks_done, rows_estimate, error FROM {} WHERE pipeline = $1 AND id = ANY($2) ORDER BY id",
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
        })
        .collect())
}

/// The publication's tables (`schema.table`), the progress table aside.
pub(super) async fn published_tables(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    publication: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(sql
        .query("SELECT schemaname || '.' || tablename FROM pg_catalog.pg_publication_tables WHERE pubname = $1 ORDER BY 1", &[&publication])
        .await?
        .iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|table| config.progress_table != *table.as_str())
        .collect())
}
