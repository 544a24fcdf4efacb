//! `sluice snapshot`: request backfills from the running daemon and follow them.

use std::time::{Duration, Instant};

use sluice_core::retry::RetryPolicy;
use sluice_postgres::ReadSession;

use super::progress::{ensure_progress_table, progress, published_tables, request};
use super::BackfillConfig;
use crate::error::{CommandContext, CommandError};

/// `sluice snapshot`: requests a backfill of `tables` (every published table when empty) from
/// the running daemon and, with `wait`, follows it to the end: a progress line on a terminal,
/// a log line every ten seconds otherwise. Fails when a request fails.
pub async fn snapshot(
    config: &crate::config::Config,
    tables: &[String],
    wait: bool,
) -> Result<(), CommandError> {
    let Some(replication) = config.source.replication() else {
        return Err(CommandError::invalid(
            "backfill needs the logical replication source ([source.replication]); a polled outbox has nothing to backfill",
        ));
    };
    let mut sql = ReadSession::connect(
        &config.source.connection,
        "sluice snapshot",
        RetryPolicy::new(config.pipeline.retry_for),
    )
    .await
    .context("cannot connect to the source database (source.connection)")?;
    open_progress_table(&mut sql, &config.backfill).await?;
    let tables: Vec<String> = if tables.is_empty() {
        sql.run(async |c| Ok(published_tables(c, &config.backfill, &replication.publication).await?))
            .await
            .with_context(|| format!("cannot list the tables of publication {}", replication.publication))?
    } else {
        tables.to_vec()
    };
    if tables.is_empty() {
        return Err(CommandError::invalid(format!(
            "publication {:?} has no tables to backfill",
            replication.publication
        )));
    }
    let mut ids = Vec::new();
    for table in &tables {
        let id = add_request(&mut sql, &config.backfill, &config.pipeline.name, table, None).await?;
        eprintln!("requested backfill {id} of {table}");
        ids.push(id);
    }
    if !wait {
        return Ok(());
    }
    follow(&mut sql, &config.backfill, &config.pipeline.name, &ids).await
}

/// Creates the progress table when it is missing (retried: it is idempotent).
pub async fn open_progress_table(sql: &mut ReadSession, config: &BackfillConfig) -> Result<(), CommandError> {
    sql.run(async |c| Ok(ensure_progress_table(c, config).await?)).await.with_context(|| {
        format!("cannot create the progress table {} (backfill.progress_table)", config.progress_table)
    })
}

/// Inserts a request; its id. Retried: should a lost connection hide an insert that did
/// commit, the table is requested twice, which only writes the same rows again.
pub async fn add_request(
    sql: &mut ReadSession,
    config: &BackfillConfig,
    pipeline: &str,
    table: &str,
    keys: Option<&[Vec<String>]>,
) -> Result<i64, CommandError> {
    sql.run(async |c| Ok(request(c, config, pipeline, table, keys).await?))
        .await
        .with_context(|| format!("cannot request a backfill of {table} in {}", config.progress_table))
}

/// Follows requests until all have ended; fails when one failed.
pub async fn follow(
    sql: &mut ReadSession,
    config: &BackfillConfig,
    pipeline: &str,
    ids: &[i64],
) -> Result<(), CommandError> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut hinted = false;
    loop {
        let requests =
            sql.run(async |c| Ok(progress(c, config, pipeline, ids).await?)).await.with_context(|| {
                format!("cannot read the progress of the requests in {}", config.progress_table)
            })?;
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
                return Err(CommandError::invalid(format!("backfill failed for {}", failed.join(", "))));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
