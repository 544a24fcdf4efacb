//! Backfill beside the stream: the daemon reads tables in primary-key chunks while it streams,
//! and merges each chunk into the stream between watermarks (`window`), so that the target
//! ends equal to the source without locking anything.
//!
//! Requests live in a progress table in the source database (`backfill.progress_table`,
//! created when missing): one row per request, a whole table or a list of keys (reconcile),
//! with its state (`pending`, `running`, `done`, `failed`), the last key of the last chunk
//! made durable, and counts. `sluice snapshot` and `sluice reconcile` insert requests and
//! watch them; the running daemon (the replica holding the HA lock) serves them — only its
//! own (by pipeline name and slot: `progress::Scope`), and only for tables of its publication. Progress is
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

mod chunk;
mod command;
mod progress;
mod ranges;
pub(crate) mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use sluice_core::retry::{Backoff, RetryPolicy};
use sluice_core::Shutdown;
use sluice_postgres::ConnectionConfig;
use tokio::sync::mpsc;

pub use crate::config::BackfillConfig;
use chunk::serve_request;
pub(crate) use command::outside_publication;
pub use command::{
    add_request, cancel, follow, open_progress_table, progress_session, snapshot, source_session,
};
pub(crate) use progress::published_tables;
pub use progress::{ensure_progress_table, estimate_rows, progress, request, Progress, Scope};
use window::Chunk;

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
/// are logged and retried under the one backoff (from `poll_interval` up to a minute, for as
/// long as it takes).
pub async fn run(
    connection: ConnectionConfig,
    scope: Scope,
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
    let policy = RetryPolicy::new(Duration::MAX)
        .with_delays(config.poll_interval.max(Duration::from_secs(1)), Duration::from_secs(60));
    let mut backoff = Backoff::new(policy);
    let mut initial_done = false;
    loop {
        let started = Instant::now();
        match serve(&connection, &scope, &config, &chunks, &shutdown, &mut initial_done).await {
            Ok(()) | Err(BackfillError::Stopped) => return,
            Err(error) => {
                // A session that served for a while starts a fresh run of failures.
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let delay = backoff.next_delay().unwrap_or(policy.max_delay);
                if backoff.attempts() == 1 {
                    tracing::warn!(error = %sluice_postgres::error::Chain(&error), table = %config.progress_table, retry_in_ms = delay.as_millis() as u64, "backfill requests cannot be served now; retrying for as long as the pipeline runs");
                } else {
                    tracing::debug!(error = %sluice_postgres::error::Chain(&error), attempt = backoff.attempts(), "backfill requests still cannot be served; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.requested() => return,
                }
            }
        }
    }
}

async fn serve(
    connection: &ConnectionConfig,
    scope: &Scope,
    config: &BackfillConfig,
    chunks: &mpsc::Sender<Chunk>,
    shutdown: &Shutdown,
    initial_done: &mut bool,
) -> Result<(), BackfillError> {
    let sql = sluice_postgres::connect_sql(connection).await?;
    ensure_progress_table(&sql, config).await?;
    if config.initial && !*initial_done {
        let requested = request_initial(&sql, config, scope).await?;
        if requested > 0 {
            tracing::info!(
                tables = requested,
                "initial backfill requested for every published table without one"
            );
        }
        *initial_done = true;
    }
    let pipeline = scope.pipeline.as_str();
    let table = config.quoted_table();
    let mut published = published_tables(&sql, config, &scope.publication).await?;
    // Requests from before the slot column, for a table another pipeline publishes: left to it.
    let mut left: Vec<i64> = Vec::new();
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
                        "SELECT id, source_table, keys::text, last_key, rows_done, slot FROM {table} \
                         WHERE pipeline = $1 AND (slot = $4 OR slot IS NULL) AND state IN ('pending', 'running') \
                           AND NOT (id = ANY($2)) ORDER BY id LIMIT $3"
                    ),
                    &[&pipeline, &[serving.as_slice(), left.as_slice()].concat(), &((config.concurrency - running.len()) as i64), &scope.slot],
                )
                .await?;
            for row in rows {
                let (id, source_table, slot): (i64, String, Option<String>) =
                    (row.get(0), row.get(1), row.get(5));
                if !published.contains(&source_table) {
                    // The publication may have grown since the last look.
                    published = published_tables(&sql, config, &scope.publication).await?;
                }
                if !published.contains(&source_table) {
                    if slot.is_none() {
                        tracing::warn!(request = id, table = %source_table, publication = %scope.publication, "a backfill request without a slot names a table outside this pipeline's publication; leaving it to the pipeline that streams the table");
                        left.push(id);
                        continue;
                    }
                    let reason = format!(
                        "table {source_table} is not in publication {} of pipeline {pipeline} (slot {})",
                        scope.publication, scope.slot
                    );
                    tracing::error!(request = id, reason = %reason, "backfill request failed");
                    sql.execute(&format!("UPDATE {table} SET state = 'failed', error = $3, finished_at = now() WHERE pipeline = $1 AND id = $2"), &[&pipeline, &id, &reason]).await?;
                    continue;
                }
                let keys: Option<String> = row.get(2);
                let request = Request {
                    id,
                    table: source_table,
                    keys: keys.and_then(|k| serde_json::from_str(&k).ok()),
                    last_key: row.get(3),
                    rows_done: row.get(4),
                };
                serving.push(request.id);
                let id = request.id;
                running.push(async move {
                    (
                        id,
                        serve_request(
                            connection,
                            pipeline,
                            &scope.publication,
                            config,
                            chunks,
                            shutdown.clone(),
                            request,
                        )
                        .await,
                    )
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
    scope: &Scope,
) -> Result<u64, BackfillError> {
    let mut requested = 0;
    for table in published_tables(sql, config, &scope.publication).await? {
        let known = sql
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE pipeline = $1 AND (slot = $3 OR slot IS NULL) AND source_table = $2 LIMIT 1",
                    config.quoted_table()
                ),
                &[&scope.pipeline, &table, &scope.slot],
            )
            .await?
            .is_some();
        if !known {
            request(sql, config, scope, &table, None).await?;
            requested += 1;
        }
    }
    Ok(requested)
}
