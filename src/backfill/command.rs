//! `sluice snapshot`: request backfills from the running daemon and follow them.

use std::time::{Duration, Instant};

use sluice_core::retry::RetryPolicy;
use sluice_postgres::ReadSession;

use super::progress::{ensure_progress_table, progress, published_tables, request, Scope};
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
    let Some(scope) = Scope::of(config) else {
        return Err(CommandError::invalid(
            "backfill needs the logical replication source ([source.replication]); a polled outbox has nothing to backfill",
        ));
    };
    let mut sql = progress_session(config, "sluice snapshot").await?;
    let published = sql
        .run(async |c| Ok(published_tables(c, &config.backfill, &scope.publication).await?))
        .await
        .with_context(|| format!("cannot list the tables of publication {}", scope.publication))?;
    let tables: Vec<String> = if tables.is_empty() { published.clone() } else { tables.to_vec() };
    if tables.is_empty() {
        return Err(CommandError::invalid(format!(
            "publication {:?} has no tables to backfill",
            scope.publication
        )));
    }
    // The daemon streams only its publication's tables: a backfill of any other would be
    // written nowhere the stream keeps up to date.
    outside_publication(&scope, &published, &tables)?;
    let mut ids = Vec::new();
    for table in &tables {
        let id = add_request(&mut sql, &config.backfill, &scope, table, None).await?;
        eprintln!("requested backfill {id} of {table}");
        ids.push(id);
    }
    if !wait {
        return Ok(());
    }
    follow(&mut sql, &config.backfill, &config.pipeline.name, &ids).await
}

/// Refuses `tables` that are not all in the pipeline's publication (`published`), naming them.
pub(crate) fn outside_publication(
    scope: &Scope,
    published: &[String],
    tables: &[String],
) -> Result<(), CommandError> {
    let outside: Vec<&str> = tables.iter().filter(|t| !published.contains(t)).map(String::as_str).collect();
    if outside.is_empty() {
        return Ok(());
    }
    let (them, are) = match outside.as_slice() {
        [one] => ("it", format!("table {one} is")),
        _ => ("them", format!("tables {} are", outside.join(", "))),
    };
    Err(CommandError::invalid(format!(
        "{are} not in publication {:?} of pipeline {:?} (source.replication.publication); \
         add {them} with ALTER PUBLICATION … ADD TABLE, or use the config of the pipeline that streams {them}",
        scope.publication, scope.pipeline,
    )))
}

/// A session on the source database, named `application_name`, with the progress table
/// there: what the commands that write or cancel requests start with.
pub async fn progress_session(
    config: &crate::config::Config,
    application_name: &str,
) -> Result<ReadSession, CommandError> {
    let mut sql = source_session(config, application_name).await?;
    open_progress_table(&mut sql, &config.backfill).await?;
    Ok(sql)
}

/// A session on the source database named `application_name`, its reads retried within
/// `pipeline.retry_for`.
pub async fn source_session(
    config: &crate::config::Config,
    application_name: &str,
) -> Result<ReadSession, CommandError> {
    ReadSession::connect(
        &config.source.connection,
        application_name,
        RetryPolicy::new(config.pipeline.retry_for),
    )
    .await
    .context("cannot connect to the source database (source.connection)")
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
    scope: &Scope,
    table: &str,
    keys: Option<&[Vec<String>]>,
) -> Result<i64, CommandError> {
    sql.run(async |c| Ok(request(c, config, scope, table, keys).await?))
        .await
        .with_context(|| format!("cannot request a backfill of {table} in {}", config.progress_table))
}

/// Cancels pending or running requests of the pipeline (snapshot or reconcile): a pending one
/// is never served, a running one stops after its current chunk, and what is durable stays.
pub async fn cancel(config: &crate::config::Config, ids: &[i64]) -> Result<(), CommandError> {
    let mut sql = progress_session(config, "sluice snapshot").await?;
    let table = config.backfill.quoted_table();
    let pipeline = &config.pipeline.name;
    let mut refused = Vec::new();
    for &id in ids {
        let cancelled = sql
            .run(async |c| {
                Ok(c.query_opt(
                    &format!(
                        "UPDATE {table} SET state = 'cancelled', finished_at = now(), error = 'cancelled by sluice snapshot --cancel' \
                         WHERE pipeline = $1 AND id = $2 AND state IN ('pending', 'running') RETURNING source_table"
                    ),
                    &[pipeline, &id],
                )
                .await?)
            })
            .await
            .with_context(|| format!("cannot cancel request {id} in {}", config.backfill.progress_table))?;
        if let Some(row) = cancelled {
            let source: String = row.get(0);
            eprintln!("cancelled request {id} ({source})");
            continue;
        }
        let state = sql
            .run(async |c| {
                Ok(c.query_opt(
                    &format!("SELECT state FROM {table} WHERE pipeline = $1 AND id = $2"),
                    &[pipeline, &id],
                )
                .await?)
            })
            .await
            .with_context(|| format!("cannot read request {id} in {}", config.backfill.progress_table))?;
        refused.push(match state {
            Some(row) => format!("request {id} has already ended ({})", row.get::<_, String>(0)),
            None => {
                format!("pipeline {pipeline:?} has no request {id} in {}", config.backfill.progress_table)
            }
        });
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(CommandError::invalid(refused.join("; ")))
    }
}

/// Follows requests until all have ended; fails when one failed.
pub async fn follow(
    sql: &mut ReadSession,
    config: &BackfillConfig,
    pipeline: &str,
    ids: &[i64],
) -> Result<(), CommandError> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = Instant::now();
    // (when, rows) of the last ten seconds: the rate is the current one, not the average.
    let mut samples: std::collections::VecDeque<(Instant, i64)> = std::collections::VecDeque::new();
    let mut serving: Option<bool> = None;
    let mut last_check = Instant::now();
    loop {
        let requests =
            sql.run(async |c| Ok(progress(c, config, pipeline, ids).await?)).await.with_context(|| {
                format!("cannot read the progress of the requests in {}", config.progress_table)
            })?;
        let ended = |r: &&super::Progress| ["done", "failed", "cancelled"].contains(&r.state.as_str());
        let ended_count = requests.iter().filter(ended).count();
        // Is a daemon there to serve them? Said at once, and again when that changes.
        if ended_count < requests.len()
            && (serving.is_none() || last_check.elapsed() >= Duration::from_secs(5))
        {
            last_check = Instant::now();
            let running = sql
                .run(async |c| Ok(crate::ha::pipeline_running(c, pipeline).await?))
                .await
                .context("cannot ask the source database whether the pipeline runs")?;
            if serving != Some(running) {
                if terminal && serving.is_some() {
                    eprintln!();
                }
                if running {
                    if serving.is_some() {
                        eprintln!("a sluice process runs pipeline {pipeline:?} now: the requests are served");
                    }
                } else {
                    eprintln!(
                        "no sluice process runs pipeline {pipeline:?} against this database: the requests wait in {} \
                         until `sluice run` starts with this config; waiting without a time limit \
                         (Ctrl-C stops waiting and leaves them pending; `sluice snapshot --cancel ID` cancels one)",
                        config.progress_table
                    );
                }
                serving = Some(running);
            }
        }
        let done = |r: &super::Progress| r.rows_done + r.chunk_rows_durable;
        let rows: i64 = requests.iter().map(done).sum();
        let estimate: i64 = requests.iter().map(|r| r.rows_estimate.unwrap_or(0).max(done(r))).sum();
        let now = Instant::now();
        samples.push_back((now, rows));
        while samples.len() > 2 && now.duration_since(samples[0].0) > Duration::from_secs(10) {
            samples.pop_front();
        }
        let (since, rows_then) = samples[0];
        let rate = (rows - rows_then) as f64 / now.duration_since(since).as_secs_f64().max(0.001);
        let percent = if estimate > 0 { 100.0 * rows as f64 / estimate as f64 } else { 0.0 };
        let line = format!(
            "backfill: {ended_count}/{} requests ended, {rows}/~{estimate} rows ({percent:.0}%, the total is an estimate), {rate:.0} rows/s now",
            requests.len()
        );
        if terminal {
            let filled = (percent / 5.0).round().clamp(0.0, 20.0) as usize;
            eprint!("\r[{}{}] {line}   ", "#".repeat(filled), "-".repeat(20 - filled));
        } else if last_line.elapsed() >= Duration::from_secs(10) || ended_count == requests.len() {
            eprintln!("{line}");
            last_line = Instant::now();
        }
        if ended_count == requests.len() {
            if terminal {
                eprintln!();
            }
            let count = |state: &str| requests.iter().filter(|r| r.state == state).count();
            let (done, failed, cancelled) = (count("done"), count("failed"), count("cancelled"));
            eprintln!("backfill ended: {done} done, {failed} failed, {cancelled} cancelled ({rows} rows)");
            let unsuccessful: Vec<String> = requests
                .iter()
                .filter(|r| r.state != "done")
                .map(|r| format!("{} {} {} ({})", r.id, r.table, r.state, r.error.as_deref().unwrap_or("?")))
                .collect();
            if !unsuccessful.is_empty() {
                return Err(CommandError::invalid(format!(
                    "backfill did not finish for {}",
                    unsuccessful.join(", ")
                )));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
