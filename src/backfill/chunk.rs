//! Serving one request: chunk after chunk between watermarks, each recorded as progress once
//! the target made it durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::StreamExt;
use sluice_core::{Shutdown, Value};
use sluice_postgres::catalog::Table;
use sluice_postgres::copy::{CopyDecoder, Page};
use sluice_postgres::ConnectionConfig;
use tokio::sync::{mpsc, oneshot};

use super::window::{Chunk, Watermark, WATERMARK_PREFIX};
use super::{BackfillConfig, BackfillError, Request};

/// Serves one request to the end (or to shutdown).
pub(super) async fn serve_request(
    connection: &ConnectionConfig,
    pipeline: &str,
    publication: &str,
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
    let (table, left_out) = match sluice_postgres::catalog::split_table(&request.table) {
        Some((schema, name)) => (
            sluice_postgres::catalog::table(&sql, schema, name).await?,
            sluice_postgres::catalog::left_out_columns(&sql, publication, schema, name).await?,
        ),
        None => (None, Vec::new()),
    };
    let Some(table) = table else {
        return Err(BackfillError::Request(format!("table {} does not exist", request.table)));
    };
    // Backfilled rows carry what the stream's rows carry, no more: the same item or row
    // whichever of the two wrote it last.
    let keyed = !table.primary_key.is_empty();
    let table = table.without(&left_out);
    if keyed && table.primary_key.is_empty() {
        return Err(BackfillError::Request(format!(
            "table {}: a primary-key column is not carried by publication {publication:?} ({}); backfill reads in \
             primary-key order and sends only what the stream sends",
            request.table,
            left_out.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        )));
    }
    if table.primary_key.is_empty() {
        return Err(BackfillError::Request(format!(
            "table {} has no primary key; backfill reads in primary-key order",
            request.table
        )));
    }
    sql.execute(
        &format!("UPDATE {progress} SET state = 'running', started_at = coalesce(started_at, now()), chunk_rows_durable = 0 WHERE pipeline = $1 AND id = $2 AND state <> 'cancelled'"),
        &[&pipeline, &request.id],
    )
    .await?;
    tracing::info!(request = request.id, table = %request.table, resuming = request.last_key.is_some(), rows_done = request.rows_done, "backfill started");
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
        // `sluice snapshot --cancel`: stop between chunks (what is durable stays).
        let state: Option<String> = sql
            .query_opt(
                &format!("SELECT state FROM {progress} WHERE pipeline = $1 AND id = $2"),
                &[&pipeline, &request.id],
            )
            .await?
            .map(|row| row.get(0));
        if state.as_deref() == Some("cancelled") {
            if let Some(last) = in_flight.take() {
                rows_this_run +=
                    record(&sql, &progress, pipeline, &request, last, None, &mut shutdown, &label).await?
                        as u64;
            }
            tracing::info!(request = request.id, table = %request.table, rows = rows_this_run, "backfill cancelled");
            return Ok(());
        }
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
        let applied = Arc::new(AtomicU64::new(0));
        let chunk = Chunk {
            id: chunk_id.clone(),
            relation: Arc::clone(&relation),
            primary_key: table.primary_key.clone(),
            rows: values,
            absent_keys,
            done,
            applied: Arc::clone(&applied),
        };
        // Never waits long: each request has at most two chunks unmerged (the channel holds two
        // per request), and the one before this was merged once its high watermark streamed.
        tokio::select! {
            sent = chunks.send(chunk) => sent.map_err(|_| BackfillError::Stopped)?,
            _ = shutdown.requested() => return Err(BackfillError::Stopped),
        }
        emit(&sql, &Watermark::text(true, pipeline, &chunk_id, &request.table)).await?;
        if let Some(previous) =
            in_flight.replace(InFlight { durable, advanced, read, last_key: read_key.clone(), applied })
        {
            rows_this_run += record(
                &sql,
                &progress,
                pipeline,
                &request,
                previous,
                in_flight.as_ref(),
                &mut shutdown,
                &label,
            )
            .await? as u64;
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
            record(&sql, &progress, pipeline, &request, last, None, &mut shutdown, &label).await? as u64;
    }
    sql.execute(
        &format!("UPDATE {progress} SET state = 'done', finished_at = now(), chunk_rows_durable = 0 WHERE pipeline = $1 AND id = $2 AND state = 'running'"),
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
    /// Its writes durable so far (the pipeline counts them part by part).
    applied: Arc<AtomicU64>,
}

impl InFlight {
    /// Rows (keys) of the chunk already durable, at most what it advances the request by.
    fn durable_so_far(&self) -> i64 {
        self.applied.load(Ordering::Relaxed).min(self.advanced as u64) as i64
    }
}

/// How often progress within the chunks in flight is written to the progress table.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Waits until the chunk is durable, then records it in the progress table; returns how far
/// it advanced the request. Meanwhile, once a second, the rows of it and of the `newer` chunk
/// already durable go to `chunk_rows_durable`, so that progress moves within a chunk (the
/// resumable position, `last_key`, moves only by whole chunks).
#[allow(clippy::too_many_arguments)]
async fn record(
    sql: &tokio_postgres::Client,
    progress: &str,
    pipeline: &str,
    request: &Request,
    mut chunk: InFlight,
    newer: Option<&InFlight>,
    shutdown: &mut Shutdown,
    label: &str,
) -> Result<usize, BackfillError> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = 0;
    loop {
        tokio::select! {
            result = &mut chunk.durable => {
                result.map_err(|_| BackfillError::ChunkLost)?;
                break;
            }
            _ = tick.tick() => {
                let now = chunk.durable_so_far() + newer.map_or(0, InFlight::durable_so_far);
                if now != shown {
                    sql.execute(
                        &format!("UPDATE {progress} SET chunk_rows_durable = $3 WHERE pipeline = $1 AND id = $2"),
                        &[&pipeline, &request.id, &now],
                    )
                    .await?;
                    shown = now;
                }
            }
            _ = shutdown.requested() => return Err(BackfillError::Stopped),
        }
    }
    let still_in_flight = newer.map_or(0, InFlight::durable_so_far);
    sql.execute(
        &format!("UPDATE {progress} SET last_key = $3, rows_done = rows_done + $4, chunks_done = chunks_done + 1, chunk_rows_durable = $5 WHERE pipeline = $1 AND id = $2"),
        &[&pipeline, &request.id, &chunk.last_key, &(chunk.advanced as i64), &still_in_flight],
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
