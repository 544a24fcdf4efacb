//! Serving one request: chunk after chunk between watermarks, each recorded as progress once
//! the target made it durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::{Shutdown, Value};
use sluice_postgres::catalog::Table;
use sluice_postgres::copy::{CopyDecoder, Page};
use sluice_postgres::{ConnectionConfig, ReplicationClient};
use tokio::sync::{mpsc, oneshot};

use super::ranges;
use super::window::{Chunk, Watermark, WATERMARK_PREFIX};
use super::{BackfillConfig, BackfillError, Request};

/// Serves one request to the end (or to shutdown).
pub(super) async fn serve_request(
    connection: &ConnectionConfig,
    pipeline: &str,
    publication: &str,
    config: &BackfillConfig,
    chunks: &mpsc::Sender<Chunk>,
    shutdown: Shutdown,
    request: Request,
) -> Result<(), BackfillError> {
    crate::faults::panic_at("backfill");
    let (mut sql, host) = reader_session(connection).await?;
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
    let ranges = ranges::plan(&sql, &progress, pipeline, &request, &table, config).await?;
    let resuming = request.last_key.is_some() || ranges.as_deref().is_some_and(ranges::progressed);
    let started = Instant::now();
    let context = Arc::new(Context {
        connection: connection.clone(),
        pipeline: pipeline.to_owned(),
        progress: progress.clone(),
        config: config.clone(),
        chunks: chunks.clone(),
        shutdown,
        request: request.id,
        label: request.table.clone(),
        relation: Arc::new(table.relation.clone()),
        table,
        keys: request.keys,
        readers: ranges
            .as_ref()
            .map_or(1, |r| r.iter().filter(|r| !r.done).count().min(config.readers_per_table()).max(1)),
    });
    tracing::info!(request = request.id, table = %request.table, resuming, rows_done = request.rows_done, readers = context.readers, ranges = ranges.as_ref().map_or(1, Vec::len), "backfill started");
    let outcome = match ranges {
        None => {
            let reader = Reader { index: 0, range: None, after: request.last_key, upto: None };
            let mut copy = ReplicationClient::connect_for_copy(&host).await?;
            let mut pending = Pending::prepare(&sql, &context).await?;
            let offset = request.rows_done.max(0) as usize;
            let mut outcome =
                serve_reader(&mut sql, &mut copy, &context, reader, offset, &mut pending).await?;
            outcome.rows += pending.finish(&sql, &context).await?;
            outcome
        }
        Some(ranges) => serve_ranges(&context, ranges).await?,
    };
    if outcome.cancelled {
        tracing::info!(request = request.id, table = %request.table, rows = outcome.rows, "backfill cancelled");
        return Ok(());
    }
    sql.execute(
        &format!("UPDATE {progress} SET state = 'done', finished_at = now(), chunk_rows_durable = 0 WHERE pipeline = $1 AND id = $2 AND state = 'running'"),
        &[&pipeline, &request.id],
    )
    .await?;
    tracing::info!(request = request.id, table = %request.table, rows = outcome.rows, seconds = started.elapsed().as_secs_f64(), "backfill finished");
    Ok(())
}

/// A connection for writing watermarks and progress, and the one host it reached (where the
/// reader's COPY session connects too).
async fn reader_session(
    connection: &ConnectionConfig,
) -> Result<(tokio_postgres::Client, ConnectionConfig), BackfillError> {
    let (sql, host) = sluice_postgres::connect_sql_choosing(connection, "sluice").await?;
    // The high watermark must reach the stream at once: flush its commit locally even where
    // synchronous_commit is off (the walsender sends only flushed WAL), without waiting for
    // synchronous standbys.
    sql.batch_execute("SET synchronous_commit = local").await?;
    Ok((sql, host))
}

/// What every reader of one request shares.
struct Context {
    connection: ConnectionConfig,
    pipeline: String,
    /// The progress table, quoted.
    progress: String,
    config: BackfillConfig,
    chunks: mpsc::Sender<Chunk>,
    shutdown: Shutdown,
    /// The request's id.
    request: i64,
    /// The table, `schema.table`.
    label: String,
    table: Table,
    relation: Arc<sluice_core::Relation>,
    /// The keys of a reconcile request (one reader only).
    keys: Option<Vec<Vec<String>>>,
    /// Readers at work: each reads at its share of `max_rows_per_second`.
    readers: usize,
}

/// One reader: the whole table (or a reconcile's keys), or one key range of the table.
struct Reader {
    /// Its number within the request, in its chunk ids.
    index: usize,
    /// Its entry in the request's `ranges`; `None` for a request read whole (its progress is
    /// `last_key`).
    range: Option<usize>,
    /// The last key read (exclusive start).
    after: Option<Vec<String>>,
    /// The range's last key (inclusive end).
    upto: Option<Vec<String>>,
}

/// How a reader ended.
#[derive(Default)]
struct Outcome {
    /// Rows (keys) made durable.
    rows: u64,
    /// It stopped at `sluice snapshot --cancel`.
    cancelled: bool,
}

/// Runs `context.readers` readers, each on connections of its own, taking the ranges not yet
/// done one after another; the first error stops the others (what they made durable stays
/// recorded).
async fn serve_ranges(context: &Arc<Context>, ranges: Vec<ranges::Range>) -> Result<Outcome, BackfillError> {
    let queue: std::collections::VecDeque<(usize, ranges::Range)> =
        ranges.into_iter().enumerate().filter(|(_, r)| !r.done).collect();
    let queue = Arc::new(std::sync::Mutex::new(queue));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..context.readers {
        let (context, queue) = (Arc::clone(context), Arc::clone(&queue));
        readers.spawn(async move {
            let (mut sql, host) = reader_session(&context.connection).await?;
            let mut copy = ReplicationClient::connect_for_copy(&host).await?;
            let mut total = Outcome::default();
            // The last chunk of one range is still in flight while the next range's first
            // is read: the reader does not wait at range boundaries.
            let mut pending = Pending::prepare(&sql, &context).await?;
            loop {
                let next = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front();
                let Some((index, range)) = next else {
                    total.rows += pending.finish(&sql, &context).await?;
                    return Ok(total);
                };
                // A range is one reader's in chunk ids (a reader's new window replaces its own).
                let reader = Reader { index, range: Some(index), after: range.after, upto: range.upto };
                let outcome = serve_reader(&mut sql, &mut copy, &context, reader, 0, &mut pending).await?;
                total.rows += outcome.rows;
                if outcome.cancelled {
                    total.cancelled = true;
                    return Ok(total);
                }
            }
        });
    }
    let mut total = Outcome::default();
    while let Some(joined) = readers.join_next().await {
        let outcome = match joined {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => {
                readers.shutdown().await;
                return Err(error);
            }
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => return Err(BackfillError::Stopped),
        };
        total.rows += outcome.rows;
        total.cancelled |= outcome.cancelled;
    }
    Ok(total)
}

/// What a reader carries from range to range: its chunk handed to the pipeline and not yet
/// recorded durable (which may belong to the range it read before), the rows of its chunks
/// in flight it has added to the request's `chunk_rows_durable`, and its session's statements.
struct Pending {
    in_flight: Option<InFlight>,
    shown: i64,
    statements: Statements,
}

/// The statements a reader runs for every chunk, prepared once on its session: each then takes
/// one round trip and no parsing or planning (unprepared, each took two).
struct Statements {
    /// `sluice snapshot --cancel`'s check and the low watermark in one: the request's state,
    /// and the watermark written unless that is `cancelled`.
    open: tokio_postgres::Statement,
    /// A watermark.
    emit: tokio_postgres::Statement,
    /// A durable chunk's progress (see `record`).
    record: tokio_postgres::Statement,
    /// Rows of the chunks in flight made durable.
    within: tokio_postgres::Statement,
}

impl Pending {
    async fn prepare(sql: &tokio_postgres::Client, context: &Context) -> Result<Self, BackfillError> {
        let progress = &context.progress;
        let statements = Statements {
            open: sql
                .prepare(&format!(
                    "SELECT state, CASE WHEN state <> 'cancelled' THEN pg_logical_emit_message(true, $3::text, $4::text) END IS NOT NULL \
                     FROM {progress} WHERE pipeline = $1 AND id = $2"
                ))
                .await?,
            emit: sql.prepare("SELECT pg_logical_emit_message(true, $1::text, $2::text)").await?,
            // `$6` is the range (NULL: the request is read whole, its position `last_key`),
            // `$7` whether the chunk is its range's last.
            record: sql
                .prepare(&format!(
                    "UPDATE {progress} SET \
                       last_key = CASE WHEN $6::int4 IS NULL THEN $3::text[] ELSE last_key END, \
                       ranges = CASE WHEN $6::int4 IS NULL THEN ranges ELSE jsonb_set( \
                         CASE WHEN $7::bool THEN jsonb_set(ranges, ARRAY[$6::int4::text, 'done'], 'true') ELSE ranges END, \
                         ARRAY[$6::int4::text, 'after'], to_jsonb($3::text[])) END, \
                       rows_done = rows_done + $4::int8, chunks_done = chunks_done + 1, \
                       chunk_rows_durable = chunk_rows_durable + $5::int8 \
                     WHERE pipeline = $1 AND id = $2"
                ))
                .await?,
            within: sql
                .prepare(&format!(
                    "UPDATE {progress} SET chunk_rows_durable = chunk_rows_durable + $3::int8 WHERE pipeline = $1 AND id = $2"
                ))
                .await?,
        };
        Ok(Pending { in_flight: None, shown: 0, statements })
    }

    /// Records the chunk still in flight once durable; returns how far it advanced the request.
    async fn finish(
        &mut self,
        sql: &tokio_postgres::Client,
        context: &Context,
    ) -> Result<u64, BackfillError> {
        let Some(last) = self.in_flight.take() else { return Ok(0) };
        let mut shutdown = context.shutdown.clone();
        Ok(record(sql, &self.statements, context, last, None, &mut self.shown, &mut shutdown).await? as u64)
    }
}

/// Reads chunk after chunk between watermarks until the reader's rows (or keys) are all made
/// durable, or the request is cancelled; `offset` is how many of a reconcile's keys are done.
/// `sql` writes the watermarks and progress; the chunks are read over `copy`, a session of
/// their own on the same host.
async fn serve_reader(
    sql: &mut tokio_postgres::Client,
    copy: &mut ReplicationClient,
    context: &Context,
    reader: Reader,
    offset: usize,
    pending: &mut Pending,
) -> Result<Outcome, BackfillError> {
    let Context { pipeline, progress, config, chunks, table, relation, .. } = context;
    let mut shutdown = context.shutdown.clone();
    let chunk_size = config.chunk_size;
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let mut chunk_no: u64 = 0;
    // One chunk is read while the one before it travels through the stream and the target:
    // `in_flight` is that one, recorded as progress once durable (in order).
    let Pending { in_flight, shown, statements } = pending;
    let mut last_log = Instant::now();
    let mut read_key = reader.after.clone();
    let mut read_offset = offset;
    let upto = reader.upto.as_ref().map(|upto| table.key_at_most(upto));
    let rate = config.max_rows_per_second as f64 / context.readers as f64;
    loop {
        // The keys of this chunk (reconcile), or the next keyset page.
        let keys: Option<&[Vec<String>]> = match &context.keys {
            Some(all) if read_offset >= all.len() => break,
            Some(all) => Some(&all[read_offset..(read_offset + chunk_size).min(all.len())]),
            None => None,
        };
        chunk_no += 1;
        let chunk_id = format!("{}.{}.{}.{}", context.request, std::process::id(), reader.index, chunk_no);
        // `sluice snapshot --cancel`: stop between chunks (what is durable stays); otherwise
        // the low watermark, in the same statement.
        let low = Watermark::text(false, pipeline, &chunk_id, &context.label);
        let opened = sql
            .query_opt(&statements.open, &[pipeline, &context.request, &WATERMARK_PREFIX, &low])
            .await?
            .map(|row| (row.get::<_, String>(0), row.get::<_, bool>(1)));
        match opened {
            Some((state, _)) if state == "cancelled" => {
                if let Some(last) = in_flight.take() {
                    outcome.rows +=
                        record(sql, statements, context, last, None, shown, &mut shutdown).await? as u64;
                }
                outcome.cancelled = true;
                return Ok(outcome);
            }
            Some((_, true)) => {}
            // The request's row is gone: the watermark still opens the window.
            _ => emit(sql, statements, &low).await?,
        }
        let (values, next_key) =
            read_chunk(copy, table, chunk_size, read_key.as_deref(), upto.as_deref(), keys).await?;
        if keys.is_none() && values.is_empty() {
            // Close the window, so that the pipeline forgets it.
            emit(sql, statements, &Watermark::text(true, pipeline, &chunk_id, &context.label)).await?;
            break;
        }
        let absent_keys = match keys {
            Some(keys) => absent(table, keys, &values)?,
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
            relation: Arc::clone(relation),
            primary_key: table.primary_key.clone(),
            rows: values,
            absent_keys,
            done,
            applied: Arc::clone(&applied),
        };
        // Never waits long: each reader has at most two chunks unmerged, and the one before
        // this was merged once its high watermark streamed.
        tokio::select! {
            sent = chunks.send(chunk) => sent.map_err(|_| BackfillError::Stopped)?,
            _ = shutdown.requested() => return Err(BackfillError::Stopped),
        }
        emit(sql, statements, &Watermark::text(true, pipeline, &chunk_id, &context.label)).await?;
        if let Some(previous) = in_flight.replace(InFlight {
            durable,
            advanced,
            read,
            range: reader.range,
            ends_range: false,
            last_key: read_key.clone(),
            applied,
        }) {
            outcome.rows +=
                record(sql, statements, context, previous, in_flight.as_ref(), shown, &mut shutdown).await?
                    as u64;
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            tracing::info!(request = context.request, table = %context.label, reader = reader.index, rows = outcome.rows, rows_per_second = (outcome.rows as f64 / started.elapsed().as_secs_f64()) as u64, "backfill progress");
            last_log = Instant::now();
        }
        if keys.is_none() && read < chunk_size {
            break;
        }
        if rate > 0.0 {
            let due = Duration::from_secs_f64(read_offset.saturating_sub(offset) as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.requested() => return Err(BackfillError::Stopped),
                }
            }
        }
    }
    // The range is done once its last chunk is recorded durable, in the same update; the
    // caller records that chunk while the reader goes on with its next range.
    let Some(range) = reader.range else { return Ok(outcome) };
    match in_flight {
        Some(last) if last.range == Some(range) => last.ends_range = true,
        // It read nothing: done at once (a chunk in flight is another range's).
        _ => {
            sql.execute(
                &format!("UPDATE {progress} SET ranges = jsonb_set(ranges, ARRAY[$3::int::text, 'done'], 'true') WHERE pipeline = $1 AND id = $2"),
                &[pipeline, &context.request, &(range as i32)],
            )
            .await?;
        }
    }
    Ok(outcome)
}

/// A chunk handed to the pipeline, not yet known durable.
struct InFlight {
    durable: oneshot::Receiver<()>,
    /// Keys (reconcile) or rows (table) the chunk advances the request by.
    advanced: usize,
    read: usize,
    /// The range it was read from (`None`: the request is read whole).
    range: Option<usize>,
    /// It is its range's last chunk: recording it marks the range done.
    ends_range: bool,
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
/// already durable are added to `chunk_rows_durable` (`shown` is this reader's share), so that
/// progress moves within a chunk (the resumable position, `last_key` or the range's `after`,
/// moves only by whole chunks).
async fn record(
    sql: &tokio_postgres::Client,
    statements: &Statements,
    context: &Context,
    mut chunk: InFlight,
    newer: Option<&InFlight>,
    shown: &mut i64,
    shutdown: &mut Shutdown,
) -> Result<usize, BackfillError> {
    let (pipeline, request) = (&context.pipeline, &context.request);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = &mut chunk.durable => {
                result.map_err(|_| BackfillError::ChunkLost)?;
                break;
            }
            _ = tick.tick() => {
                let now = chunk.durable_so_far() + newer.map_or(0, InFlight::durable_so_far);
                if now != *shown {
                    sql.execute(&statements.within, &[pipeline, request, &(now - *shown)]).await?;
                    *shown = now;
                }
            }
            _ = shutdown.requested() => return Err(BackfillError::Stopped),
        }
    }
    let still_in_flight = newer.map_or(0, InFlight::durable_so_far);
    let range = chunk.range.map(|range| range as i32);
    sql.execute(
        &statements.record,
        &[
            pipeline,
            request,
            &chunk.last_key,
            &(chunk.advanced as i64),
            &(still_in_flight - *shown),
            &range,
            &chunk.ends_range,
        ],
    )
    .await?;
    *shown = still_in_flight;
    metrics::counter!(crate::metrics::BACKFILL_ROWS_TOTAL, "table" => context.label.clone())
        .increment(chunk.read as u64);
    metrics::counter!(crate::metrics::BACKFILL_CHUNKS_TOTAL, "table" => context.label.clone()).increment(1);
    Ok(chunk.advanced)
}

async fn emit(
    sql: &tokio_postgres::Client,
    statements: &Statements,
    text: &str,
) -> Result<(), tokio_postgres::Error> {
    sql.execute(&statements.emit, &[&WATERMARK_PREFIX, &text]).await.map(|_| ())
}

/// Reads one chunk in a snapshot that sees every transaction committed before the low
/// watermark (see the module header): the rows' columns as text; `upto` is the condition that
/// ends a key range.
async fn read_chunk(
    copy: &mut ReplicationClient,
    table: &Table,
    chunk_size: usize,
    after: Option<&[String]>,
    upto: Option<&str>,
    keys: Option<&[Vec<String>]>,
) -> Result<Page, BackfillError> {
    // Pages go through COPY (text format, the types' output functions, as `::text` gives):
    // several times cheaper than a SELECT's rows. COPY takes no parameters: the queries write
    // the keys as literals.
    let columns = table.select_list(false);
    let query = match keys {
        Some(keys) => table.keys_query(&columns, keys),
        None => table.page_query(&columns, after, chunk_size, upto),
    };
    let bad = |e: String| BackfillError::Request(format!("table {}: {e}", table.relation.qualified_name()));
    for _ in 0..100 {
        // The first statement after BEGIN fixes the snapshot.
        let lagging = copy
            .simple_query(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE pg_xact_status(x) = 'committed'",
            )
            .await?;
        if lagging.first().and_then(|row| row.first()).and_then(Option::as_deref) != Some("0") {
            copy.simple_query("ROLLBACK").await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        if let Some(delay) = crate::faults::backfill_window_delay() {
            tokio::time::sleep(delay).await;
        }
        let mut decoder = CopyDecoder::new(table);
        // After a failure the session is dropped with the reader, its transaction with it.
        copy.copy_out(&format!("COPY ({query}) TO STDOUT; COMMIT"), |part| decoder.feed(part).map_err(bad))
            .await?;
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
