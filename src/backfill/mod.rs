//! Backfill beside the stream: the daemon reads tables in primary-key chunks while it streams,
//! and merges each chunk into the stream between watermarks (`window`), so that the target
//! ends equal to the source without locking anything.
//!
//! Requests live in a progress table in the source database (`backfill.progress_table`,
//! created when missing): one row per request, a whole table or a list of keys (reconcile),
//! with its state (`pending`, `running`, `done`, `failed`), the last key of the last chunk
//! made durable, and counts. `sluice snapshot` and `sluice reconcile` insert requests and
//! watch them; the running daemon (the replica holding the HA lock) serves them. Progress is
//! written only after the chunk's writes are durable in the target, so a kill -9 resumes at
//! the last finished chunk, and a chunk done twice writes the same rows again at a newer
//! position.
//!
//! A chunk: write the low watermark; open a read-only REPEATABLE READ transaction and check
//! its snapshot (below); read up to `chunk_size` rows after the last key; hand them to the
//! pipeline; write the high watermark; wait until the pipeline reports them durable; record
//! the progress; throttle to `max_rows_per_second`.
//!
//! The snapshot check: a transaction whose commit record precedes the low watermark in the
//! WAL is normally visible to a snapshot taken after it. It is not while its backend has
//! written the commit record but not yet left the process array — the commit waits there for
//! synchronous replication, for example. Its changes would then be in neither the chunk nor
//! the window. Such a transaction shows as committed (`pg_xact_status`) while the snapshot
//! still lists it as running; the reader sees that, drops the snapshot and takes another.

pub mod window;

use sluice_core::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use sluice_core::Value;
use sluice_postgres::catalog::Table;
use sluice_postgres::ConnectionConfig;
use tokio::sync::{mpsc, oneshot};

pub use crate::config::BackfillConfig;
use sluice_postgres::copy::{CopyDecoder, Page};
use window::{Chunk, Watermark, WATERMARK_PREFIX};

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
    pub id: i64,
    pub table: String,
    pub state: String,
    pub rows_done: i64,
    pub chunks_done: i64,
    pub rows_estimate: Option<i64>,
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

/// A request as the daemon serves it.
struct Request {
    id: i64,
    table: String,
    keys: Option<Vec<Vec<String>>>,
    last_key: Option<Vec<String>>,
    rows_done: i64,
}

/// Why a request stopped.
#[derive(Debug, thiserror::Error)]
enum BackfillError {
    /// The request can never be served as made (no such table, no primary key): it fails.
    #[error("{0}")]
    Request(String),
    #[error("backfill SQL failed")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Source(#[from] sluice_postgres::Error),
    /// The pipeline stopped (shutdown, or a failed target): the request stays running and
    /// resumes at the next start.
    #[error("the pipeline stopped")]
    Stopped,
    /// The pipeline dropped a chunk without merging it (its window was lost): the request
    /// resumes at its last recorded chunk.
    #[error("a chunk was not merged into the stream")]
    ChunkLost,
}

/// Serves this pipeline's requests until `shutdown`. Never fatal to the pipeline: failures
/// are logged and retried at the next `poll_interval`.
pub async fn run(
    connection: ConnectionConfig,
    pipeline: String,
    publication: String,
    config: BackfillConfig,
    chunks: mpsc::Sender<Chunk>,
    source: Arc<sluice_postgres::SourceStats>,
    mut shutdown: Shutdown,
) {
    // Watermarks written before the slot exists would never come back through the stream:
    // wait until the source streams once.
    while !source.streaming.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.requested() => return,
        }
    }
    let mut announced = false;
    let mut initial_done = false;
    loop {
        match serve(&connection, &pipeline, &publication, &config, &chunks, &shutdown, &mut initial_done)
            .await
        {
            Ok(()) => return,
            Err(BackfillError::Stopped) => return,
            Err(error) => {
                if !announced {
                    tracing::warn!(error = %sluice_postgres::error::Chain(&error), table = %config.progress_table, "backfill requests cannot be served now; retrying");
                    announced = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval.max(Duration::from_secs(5))) => {}
            _ = shutdown.requested() => return,
        }
    }
}

async fn serve(
    connection: &ConnectionConfig,
    pipeline: &str,
    publication: &str,
    config: &BackfillConfig,
    chunks: &mpsc::Sender<Chunk>,
    shutdown: &Shutdown,
    initial_done: &mut bool,
) -> Result<(), BackfillError> {
    let sql = sluice_postgres::connect_sql(connection).await?;
    ensure_progress_table(&sql, config).await?;
    if config.initial && !*initial_done {
        let requested = request_initial(&sql, config, pipeline, publication).await?;
        if requested > 0 {
            tracing::info!(
                tables = requested,
                "initial backfill requested for every published table without one"
            );
        }
        *initial_done = true;
    }
    let table = config.quoted_table();
    let mut running = FuturesUnordered::new();
    let mut serving: Vec<i64> = Vec::new();
    let mut shutdown_wait = shutdown.clone();
    loop {
        if shutdown.is_requested() {
            return Ok(());
        }
        if running.len() < config.concurrency {
            let rows = sql
                .query(
                    &format!(
                        "SELECT id, source_table, keys::text, last_key, rows_done FROM {table} \
                         WHERE pipeline = $1 AND state IN ('pending', 'running') AND NOT (id = ANY($2)) ORDER BY id LIMIT $3"
                    ),
                    &[&pipeline, &serving, &((config.concurrency - running.len()) as i64)],
                )
                .await?;
            for row in rows {
                let keys: Option<String> = row.get(2);
                let request = Request {
                    id: row.get(0),
                    table: row.get(1),
                    keys: keys.and_then(|k| serde_json::from_str(&k).ok()),
                    last_key: row.get(3),
                    rows_done: row.get(4),
                };
                serving.push(request.id);
                let id = request.id;
                running.push(async move {
                    (id, serve_request(connection, pipeline, config, chunks, shutdown.clone(), request).await)
                });
            }
        }
        metrics::gauge!(crate::metrics::BACKFILL_ACTIVE).set(running.len() as f64);
        tokio::select! {
            Some((id, result)) = running.next(), if !running.is_empty() => {
                serving.retain(|&s| s != id);
                match result {
                    Ok(()) => {}
                    Err(BackfillError::Stopped) => return Err(BackfillError::Stopped),
                    Err(BackfillError::ChunkLost) if !chunks.is_closed() => {
                        tracing::warn!(request = id, "a backfill chunk was not merged into the stream; resuming the request at its last recorded chunk");
                    }
                    Err(BackfillError::ChunkLost) => return Err(BackfillError::Stopped),
                    Err(BackfillError::Request(reason)) => {
                        tracing::error!(request = id, reason = %reason, "backfill request failed");
                        sql.execute(&format!("UPDATE {table} SET state = 'failed', error = $3, finished_at = now() WHERE pipeline = $1 AND id = $2"), &[&pipeline, &id, &reason]).await?;
                    }
                    Err(other) => return Err(other),
                }
            }
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = shutdown_wait.requested() => return Ok(()),
        }
    }
}

/// Requests a backfill of each published table that has none yet; returns how many.
async fn request_initial(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    pipeline: &str,
    publication: &str,
) -> Result<u64, BackfillError> {
    let mut requested = 0;
    for table in published_tables(sql, config, publication).await? {
        let known = sql
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE pipeline = $1 AND source_table = $2 LIMIT 1",
                    config.quoted_table()
                ),
                &[&pipeline, &table],
            )
            .await?
            .is_some();
        if !known {
            request(sql, config, pipeline, &table, None).await?;
            requested += 1;
        }
    }
    Ok(requested)
}

/// The publication's tables (`schema.table`), the progress table aside.
async fn published_tables(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    publication: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(sql
        .query("SELECT schemaname || '.' || tablename FROM pg_catalog.pg_publication_tables WHERE pubname = $1 ORDER BY 1", &[&publication])
        .await?
        .iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|table| *table != config.progress_table)
        .collect())
}

/// Serves one request to the end (or to shutdown).
async fn serve_request(
    connection: &ConnectionConfig,
    pipeline: &str,
    config: &BackfillConfig,
    chunks: &mpsc::Sender<Chunk>,
    mut shutdown: Shutdown,
    request: Request,
) -> Result<(), BackfillError> {
    crate::faults::panic_at("backfill");
    let mut sql = sluice_postgres::connect_sql(connection).await?;
    // The high watermark must reach the stream at once: flush its commit locally even where
    // synchronous_commit is off (the walsender sends only flushed WAL), without waiting for
    // synchronous standbys.
    sql.batch_execute("SET synchronous_commit = local").await?;
    let progress = config.quoted_table();
    let table = match sluice_postgres::catalog::split_table(&request.table) {
        Some((schema, name)) => sluice_postgres::catalog::table(&sql, schema, name).await?,
        None => None,
    };
    let Some(table) = table else {
        return Err(BackfillError::Request(format!("table {} does not exist", request.table)));
    };
    if table.primary_key.is_empty() {
        return Err(BackfillError::Request(format!(
            "table {} has no primary key; backfill reads in primary-key order",
            request.table
        )));
    }
    sql.execute(
        &format!("UPDATE {progress} SET state = 'running', started_at = coalesce(started_at, now()) WHERE pipeline = $1 AND id = $2"),
        &[&pipeline, &request.id],
    )
    .await?;
    tracing::info!(request = request.id, table = %request.table, resume_after = ?request.last_key.as_ref().map(|k| k.len()), "backfill started");
    let relation = Arc::new(table.relation.clone());
    let label = request.table.clone();
    let started = Instant::now();
    let mut rows_this_run: u64 = 0;
    let offset = request.rows_done.max(0) as usize;
    let mut chunk_no: u64 = 0;
    // One chunk is read while the one before it travels through the stream and the target:
    // `in_flight` is that one, recorded as progress once durable (in order).
    let mut in_flight: Option<InFlight> = None;
    let mut last_log = Instant::now();
    let mut read_key = request.last_key.clone();
    let mut read_offset = offset;
    loop {
        chunk_no += 1;
        let chunk_id = format!("{}.{}.{}", request.id, std::process::id(), chunk_no);
        // The keys of this chunk (reconcile), or the next keyset page.
        let keys: Option<&[Vec<String>]> = match &request.keys {
            Some(all) if read_offset >= all.len() => break,
            Some(all) => Some(&all[read_offset..(read_offset + config.chunk_size).min(all.len())]),
            None => None,
        };
        emit(&sql, &Watermark::text(false, pipeline, &chunk_id, &request.table)).await?;
        let (values, next_key) =
            read_chunk(&mut sql, &table, config.chunk_size, read_key.as_deref(), keys).await?;
        if keys.is_none() && values.is_empty() {
            // Close the window, so that the pipeline forgets it.
            emit(&sql, &Watermark::text(true, pipeline, &chunk_id, &request.table)).await?;
            break;
        }
        let absent_keys = match keys {
            Some(keys) => absent(&table, keys, &values)?,
            None => Vec::new(),
        };
        let read = values.len();
        let advanced = keys.map_or(read, <[_]>::len);
        read_offset += advanced;
        if keys.is_none() {
            read_key = next_key;
        }
        let (done, durable) = oneshot::channel();
        let chunk = Chunk {
            id: chunk_id.clone(),
            relation: Arc::clone(&relation),
            primary_key: table.primary_key.clone(),
            rows: values,
            absent_keys,
            done,
        };
        // Never waits long: each request has at most two chunks unmerged (the channel holds two
        // per request), and the one before this was merged once its high watermark streamed.
        tokio::select! {
            sent = chunks.send(chunk) => sent.map_err(|_| BackfillError::Stopped)?,
            _ = shutdown.requested() => return Err(BackfillError::Stopped),
        }
        emit(&sql, &Watermark::text(true, pipeline, &chunk_id, &request.table)).await?;
        if let Some(previous) =
            in_flight.replace(InFlight { durable, advanced, read, last_key: read_key.clone() })
        {
            rows_this_run +=
                record(&sql, &progress, pipeline, &request, previous, &mut shutdown, &label).await? as u64;
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            let done = offset as u64 + rows_this_run;
            tracing::info!(request = request.id, table = %request.table, rows = done, rows_per_second = (rows_this_run as f64 / started.elapsed().as_secs_f64()) as u64, "backfill progress");
            last_log = Instant::now();
        }
        if keys.is_none() && read < config.chunk_size {
            break;
        }
        if config.max_rows_per_second > 0 {
            let due = Duration::from_secs_f64(
                read_offset.saturating_sub(offset) as f64 / config.max_rows_per_second as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.requested() => return Err(BackfillError::Stopped),
                }
            }
        }
    }
    if let Some(last) = in_flight.take() {
        rows_this_run +=
            record(&sql, &progress, pipeline, &request, last, &mut shutdown, &label).await? as u64;
    }
    sql.execute(
        &format!("UPDATE {progress} SET state = 'done', finished_at = now() WHERE pipeline = $1 AND id = $2"),
        &[&pipeline, &request.id],
    )
    .await?;
    tracing::info!(request = request.id, table = %request.table, rows = rows_this_run, seconds = started.elapsed().as_secs_f64(), "backfill finished");
    Ok(())
}

/// A chunk handed to the pipeline, not yet known durable.
struct InFlight {
    durable: oneshot::Receiver<()>,
    /// Keys (reconcile) or rows (table) the chunk advances the request by.
    advanced: usize,
    read: usize,
    /// The keyset position after it.
    last_key: Option<Vec<String>>,
}

/// Waits until the chunk is durable, then records it in the progress table; returns how far
/// it advanced the request.
async fn record(
    sql: &tokio_postgres::Client,
    progress: &str,
    pipeline: &str,
    request: &Request,
    chunk: InFlight,
    shutdown: &mut Shutdown,
    label: &str,
) -> Result<usize, BackfillError> {
    tokio::select! {
        result = chunk.durable => result.map_err(|_| BackfillError::ChunkLost)?,
        _ = shutdown.requested() => return Err(BackfillError::Stopped),
    }
    sql.execute(
        &format!("UPDATE {progress} SET last_key = $3, rows_done = rows_done + $4, chunks_done = chunks_done + 1 WHERE pipeline = $1 AND id = $2"),
        &[&pipeline, &request.id, &chunk.last_key, &(chunk.advanced as i64)],
    )
    .await?;
    metrics::counter!(crate::metrics::BACKFILL_ROWS_TOTAL, "table" => label.to_owned())
        .increment(chunk.read as u64);
    metrics::counter!(crate::metrics::BACKFILL_CHUNKS_TOTAL, "table" => label.to_owned()).increment(1);
    Ok(chunk.advanced)
}

async fn emit(sql: &tokio_postgres::Client, text: &str) -> Result<(), tokio_postgres::Error> {
    sql.execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&WATERMARK_PREFIX, &text]).await.map(|_| ())
}

/// Reads one chunk in a snapshot that sees every transaction committed before the low
/// watermark (see the module header): the rows' columns as text.
async fn read_chunk(
    sql: &mut tokio_postgres::Client,
    table: &Table,
    chunk_size: usize,
    after: Option<&[String]>,
    keys: Option<&[Vec<String>]>,
) -> Result<Page, BackfillError> {
    // Pages go through COPY (text format, the types' output functions, as `::text` gives):
    // several times cheaper than a SELECT's rows. COPY takes no parameters: the queries write
    // the keys as literals.
    let columns = table.select_list(false);
    let query = match keys {
        Some(keys) => table.keys_query(&columns, keys),
        None => table.page_query(&columns, after, chunk_size, None),
    };
    let statement = format!("COPY ({query}) TO STDOUT");
    for _ in 0..100 {
        let txn = sql
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The first statement fixes the snapshot.
        let lagging: i64 = txn
            .query_one("SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE pg_xact_status(x) = 'committed'", &[])
            .await?
            .get(0);
        if lagging > 0 {
            txn.rollback().await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        if let Some(delay) = crate::faults::backfill_window_delay() {
            tokio::time::sleep(delay).await;
        }
        let stream = txn.copy_out(&statement).await?;
        futures_util::pin_mut!(stream);
        let mut decoder = CopyDecoder::new(table);
        let bad =
            |e: String| BackfillError::Request(format!("table {}: {e}", table.relation.qualified_name()));
        while let Some(part) = stream.next().await {
            decoder.feed(&part?).map_err(bad)?;
        }
        txn.commit().await?;
        return decoder.finish().map_err(bad);
    }
    Err(BackfillError::Request("no snapshot without committed-but-running transactions in 100 tries".into()))
}

/// The requested keys the rows read do not have, decoded (compared as values, so that `01`
/// and `1` are one integer key).
fn absent(
    table: &Table,
    keys: &[Vec<String>],
    rows: &[Vec<Value>],
) -> Result<Vec<Vec<Value>>, BackfillError> {
    let found: std::collections::HashSet<String> = rows
        .iter()
        .map(|row| sluice_core::value::key_identity(table.primary_key.iter().map(|&i| &row[i])))
        .collect();
    let mut missing = Vec::new();
    for key in keys {
        let values = table.decode_key(key).map_err(BackfillError::Request)?;
        if !found.contains(&sluice_core::value::key_identity(&values)) {
            missing.push(values);
        }
    }
    Ok(missing)
}

/// `sluice snapshot`: requests a backfill of `tables` (every published table when empty) from
/// the running daemon and, with `wait`, follows it to the end: a progress line on a terminal,
/// a log line every ten seconds otherwise. Fails when a request fails.
pub async fn snapshot(config: &crate::config::Config, tables: &[String], wait: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let Some(replication) = &config.source.replication else {
        anyhow::bail!("backfill needs the logical replication source ([source.replication]); a polled outbox has nothing to backfill");
    };
    let sql = sluice_postgres::connect_sql(&config.source.connection)
        .await
        .context("cannot connect to the source database")?;
    ensure_progress_table(&sql, &config.backfill).await.with_context(|| {
        format!(
            "cannot create the progress table {} (backfill.progress_table)",
            config.backfill.progress_table
        )
    })?;
    let tables: Vec<String> = if tables.is_empty() {
        published_tables(&sql, &config.backfill, &replication.publication).await?
    } else {
        tables.to_vec()
    };
    if tables.is_empty() {
        anyhow::bail!("publication {:?} has no tables to backfill", replication.publication);
    }
    let mut ids = Vec::new();
    for table in &tables {
        let id = request(&sql, &config.backfill, &config.pipeline.name, table, None).await?;
        eprintln!("requested backfill {id} of {table}");
        ids.push(id);
    }
    if !wait {
        return Ok(());
    }
    follow(&sql, &config.backfill, &config.pipeline.name, &ids).await
}

/// Follows requests until all have ended; fails when one failed.
pub async fn follow(
    sql: &tokio_postgres::Client,
    config: &BackfillConfig,
    pipeline: &str,
    ids: &[i64],
) -> anyhow::Result<()> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut hinted = false;
    loop {
        let requests = progress(sql, config, pipeline, ids).await?;
        let ended = requests.iter().filter(|r| r.state == "done" || r.state == "failed").count();
        let rows: i64 = requests.iter().map(|r| r.rows_done).sum();
        let estimate: i64 = requests.iter().map(|r| r.rows_estimate.unwrap_or(0).max(r.rows_done)).sum();
        let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
        let percent = if estimate > 0 { 100.0 * rows as f64 / estimate as f64 } else { 0.0 };
        let line = format!(
            "backfill: {ended}/{} requests ended, {rows}/~{estimate} rows ({percent:.0}%), {rate:.0} rows/s",
            requests.len()
        );
        if terminal {
            let filled = (percent / 5.0).round().clamp(0.0, 20.0) as usize;
            eprint!("\r[{}{}] {line}   ", "#".repeat(filled), "-".repeat(20 - filled));
        } else if last_line.elapsed() >= Duration::from_secs(10) || ended == requests.len() {
            eprintln!("{line}");
            last_line = Instant::now();
        }
        if !hinted
            && started.elapsed() > Duration::from_secs(30)
            && requests.iter().all(|r| r.state == "pending")
        {
            eprintln!("\nno daemon has picked the request up yet: is `sluice run` streaming this pipeline ({pipeline}) with backfill.enabled?");
            hinted = true;
        }
        if ended == requests.len() {
            if terminal {
                eprintln!();
            }
            let failed: Vec<String> = requests
                .iter()
                .filter(|r| r.state == "failed")
                .map(|r| format!("{} ({})", r.table, r.error.as_deref().unwrap_or("?")))
                .collect();
            if !failed.is_empty() {
                anyhow::bail!("backfill failed for {}", failed.join(", "));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
