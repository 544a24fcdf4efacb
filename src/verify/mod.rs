//! `sluice verify` and `sluice reconcile`: is the target (DynamoDB or Postgres: each target's side
//! is its `targets/<name>/verify.rs`) equal to the source, key by key, through the mapping — and if not, re-drive
//! exactly the keys that differ.
//!
//! Verify reads each mapped table in primary-key chunks inside one consistent snapshot
//! (a read-only REPEATABLE READ transaction), translates every row as the stream would (the
//! same translator: renames, drops, types, filters, key templates), and reads the items those
//! rows must be with consistent BatchGetItem. A row whose item is absent (or a tombstone) is
//! *missing*; an item whose attributes differ is *different*, named by attribute (values only
//! with `--values`: they may be personal data). Then it scans each DynamoDB table whose
//! source tables were all verified, a page at a time: a live item no row produced is *extra*
//! (the pass keeps a 16-byte digest of each expected key for this). Its source key is
//! recovered from the key templates (or from the item's own attributes), so that reconcile can
//! re-drive it.
//!
//! Rows change while verify runs. Every key found wrong is checked again once the stream has
//! passed the WAL position at the end of the pass (the slot's confirmed position, waited for up
//! to `--recheck-timeout`), with a fresh read of the row and the item, and again (up to three
//! rounds) past the newest position while keys stay wrong: only keys still wrong are reported.
//!
//! Reconcile verifies, then asks the running daemon to backfill exactly the wrong keys (a
//! request in the progress table with a key list, served between watermarks like any chunk:
//! rows present in the source are written, keys the source no longer has are deleted, all
//! through the position guard), follows the request, and verifies those keys again.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sluice_core::retry::RetryPolicy;
use sluice_postgres::catalog::Table;
use sluice_postgres::ReadSession;
use tokio::sync::Mutex;

use crate::compare::{decode_row, Finding};
pub use crate::compare::{Difference, Extra, Report, SourceKey, TableReport};
use crate::config::Config;
use crate::error::{CommandContext, CommandError};
use crate::targets::dynamodb::verify::DynamoSide;
use crate::targets::postgres::verify::PgSide;
use crate::targets::TargetConfig;
use sluice_core::Value;

pub mod background;
mod print;
mod recheck;
mod reconcile;

pub use print::print;
use recheck::{current_lsn, recheck};
pub use reconcile::reconcile;

/// `sluice verify` and `sluice reconcile`'s arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    /// The configuration file.
    #[arg(short, long)]
    pub config: std::path::PathBuf,
    /// A source table (`schema.table`) to verify; repeat for several. Default: every mapped table.
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    /// Keys listed per table and kind of difference.
    #[arg(long, default_value_t = 10)]
    pub show: usize,
    /// Also print the differing values (they may be personal data).
    #[arg(long)]
    pub values: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Rows per chunk.
    #[arg(long, default_value_t = 1000)]
    pub chunk_size: usize,
    /// Most rows read per second; 0 for no limit.
    #[arg(long, default_value_t = 0)]
    pub max_rows_per_second: u64,
    /// Verify a random fraction of the rows (0 < f ≤ 1); extra items are not looked for then.
    #[arg(long)]
    pub sample: Option<f64>,
    /// How long to wait for the stream to pass the end of the pass before re-checking.
    #[arg(long, default_value = "60s", value_parser = sluice_core::duration::parse)]
    pub recheck_timeout: Duration,
    /// `reconcile` only: also rewrite items the position guard protects from the stream
    /// because their version attribute was removed (they are deleted, then written again
    /// from the source through the guarded path).
    #[arg(long)]
    pub force: bool,
    /// The daemon's background pass: nothing printed, and no snapshot held across the pass
    /// (each chunk is its own read, so a slow, throttled pass never holds back vacuum; the
    /// re-check covers rows that changed in between).
    #[arg(skip)]
    pub background: bool,
}

struct Verifier {
    config: Config,
    /// The source database: one session, used by one step at a time (the lock lets a step
    /// reconnect through `&self`).
    sql: Mutex<ReadSession>,
    /// The mapped source tables.
    tables: HashMap<String, Table>,
    /// (source table, target table) of every table mapping, in mapping order.
    pairs: Vec<(String, String)>,
    side: Side,
}

/// The target side of a comparison.
enum Side {
    Dynamo(DynamoSide),
    Postgres(PgSide),
}

impl Verifier {
    async fn open(config: &Config) -> Result<Self, CommandError> {
        // Every read of the command retries transient failures for the pipeline's budget.
        let retry = RetryPolicy::new(config.pipeline.retry_for);
        let (side, pairs): (Side, Vec<(String, String)>) =
            match &config.target {
                TargetConfig::Dynamodb(dynamo) => {
                    let side = DynamoSide::open(dynamo).await?;
                    let pairs = side.pairs();
                    (Side::Dynamo(side), pairs)
                }
                TargetConfig::Postgres(pg) => {
                    let side = PgSide::open(pg, retry).await?;
                    let pairs = side.pairs();
                    (Side::Postgres(side), pairs)
                }
                _ => return Err(CommandError::invalid(
                    "verify compares a DynamoDB or Postgres target with its source; target.kind is neither",
                )),
            };
        let mut sql = ReadSession::connect(&config.source.connection, "sluice verify", retry)
            .await
            .context("cannot connect to the source database (source.connection)")?;
        let mut tables = HashMap::new();
        for (source, _) in &pairs {
            let publication = config.source.replication().map(|r| r.publication.as_str());
            let found = sql
                .run(async |client| {
                    let table =
                        sluice_postgres::catalog::required_table(client, source, "mapping source").await?;
                    // Compared as the stream carries it: a column the publication never
                    // sends is in no target row or item.
                    let Some(publication) = publication else { return Ok(table) };
                    let (schema, name) = (&table.relation.namespace, &table.relation.name);
                    let left_out =
                        sluice_postgres::catalog::left_out_columns(client, publication, schema, name).await?;
                    Ok(table.without(&left_out))
                })
                .await
                .with_context(|| format!("cannot read the catalog of source table {source}"))?;
            if found.primary_key.is_empty() {
                return Err(CommandError::invalid(format!(
                    "table {source} has no primary key; verify reads in primary-key order"
                )));
            }
            tables.insert(source.clone(), found);
        }
        let mut side = side;
        if let Side::Dynamo(dynamo) = &mut side {
            // Items the application wrote after a cutover carry no version: not a difference.
            let (migration, pipeline) = (&config.migration, &config.pipeline.name);
            let moved = sql
                .run(async |c| {
                    crate::migration::command::split(
                        crate::migration::moved_tables(c, migration, pipeline).await,
                    )
                })
                .await
                .context("cannot read the migration phases")?
                .map_err(|e| CommandError::invalid(e.to_string()))?;
            dynamo.set_app_written(moved);
        }
        Ok(Verifier { config: config.clone(), sql: Mutex::new(sql), tables, pairs, side })
    }

    fn selected(&self, names: &[String]) -> Result<Vec<(String, String)>, CommandError> {
        for name in names {
            if !self.pairs.iter().any(|(source, _)| source == name) {
                return Err(CommandError::invalid(format!("table {name} is not in the mapping")));
            }
        }
        Ok(self
            .pairs
            .iter()
            .filter(|(source, _)| names.is_empty() || names.contains(source))
            .cloned()
            .collect())
    }

    /// Compares rows of `source` with what `target` holds for them; returns each row's key, the
    /// digest of the target key it must have (none when filtered out or untranslatable), and
    /// the finding.
    async fn check_rows(
        &self,
        source: &str,
        target: &str,
        rows: Vec<Vec<Value>>,
    ) -> Result<Vec<(SourceKey, Option<u128>, Finding)>, CommandError> {
        let table = &self.tables[source];
        match &self.side {
            Side::Dynamo(side) => side.check_rows(target, table, rows).await,
            Side::Postgres(side) => side.check_rows(target, table, rows).await,
        }
    }

    /// Rows of `table` with these keys, in a fresh snapshot.
    async fn rows_by_key(&self, table: &Table, keys: &[SourceKey]) -> Result<Vec<Vec<Value>>, CommandError> {
        let names: Vec<&String> =
            table.primary_key.iter().map(|&i| &table.relation.columns[i].name).collect();
        let lists: Vec<Vec<String>> = keys
            .iter()
            .map(|k| names.iter().map(|n| k.get(*n).cloned().unwrap_or_default()).collect())
            .collect();
        let mut rows = Vec::new();
        for group in lists.chunks(1000) {
            let statement = table.keys_query(&table.select_list(true), group);
            let found = self.sql.lock().await.query(&statement, &[]).await.with_context(|| {
                format!("cannot read rows of source table {}", table.relation.qualified_name())
            })?;
            for row in found {
                rows.push(decode_row(table, &row)?);
            }
        }
        Ok(rows)
    }
}

/// Runs a verify pass and the re-check; the report.
pub async fn verify(config: &Config, args: &VerifyArgs) -> Result<Report, CommandError> {
    if args.force {
        return Err(CommandError::invalid("--force is for `sluice reconcile`: verify changes nothing"));
    }
    verify_with(&Verifier::open(config).await?, args).await
}

async fn verify_with(verifier: &Verifier, args: &VerifyArgs) -> Result<Report, CommandError> {
    let selected = verifier.selected(&args.tables)?;
    let started = Instant::now();
    let mut reports: Vec<TableReport> = Vec::new();
    let mut expected_keys: HashMap<String, HashSet<u128>> = HashMap::new();
    let mut rows_read: u64 = 0;
    // Differences caught in flight are re-checked once the stream has passed them: without a
    // daemon, that wait can only run out.
    let pipeline = verifier.config.pipeline.name.clone();
    let running = verifier
        .sql
        .lock()
        .await
        .run(async |c| Ok(crate::ha::pipeline_running(c, &pipeline).await?))
        .await
        .context("cannot ask the source database whether the pipeline runs")?;
    if !running && !args.background && verifier.config.source.replication().is_some() {
        eprintln!(
            "verify: no sluice process runs pipeline {pipeline:?} against this database: differences are re-checked after \
             waiting at most {} s (--recheck-timeout) for a stream that is not running",
            args.recheck_timeout.as_secs()
        );
    }
    // The total to show a percentage against: the tables' estimated rows.
    let mut total: i64 = 0;
    for (source, _) in &selected {
        let estimate = verifier
            .sql
            .lock()
            .await
            .run(async |c| Ok(crate::backfill::estimate_rows(c, source).await?))
            .await
            .with_context(|| format!("cannot estimate the rows of source table {source}"))?;
        total += estimate.unwrap_or(0);
    }
    if let Some(fraction) = args.sample {
        total = (total as f64 * fraction) as i64;
    }
    let mut last_line = Instant::now();
    // One snapshot for the whole pass (a new one after a lost connection: the pass keeps its
    // place by key, and the re-check below covers rows that changed in between).
    if !args.background {
        verifier
            .sql
            .lock()
            .await
            .begin_snapshot()
            .await
            .context("cannot open a snapshot of the source database")?;
    }
    let pass = async {
        for (source, target) in &selected {
            let table = &verifier.tables[source];
            let mut report =
                TableReport { table: source.clone(), target: target.clone(), ..TableReport::default() };
            let mut after: Option<Vec<String>> = None;
            let sample = args.sample.map(|f| format!("random() < {f}"));
            loop {
                let statement = table.page_query(
                    &table.select_list(true),
                    after.as_deref(),
                    args.chunk_size,
                    sample.as_deref(),
                );
                let rows = verifier
                    .sql
                    .lock()
                    .await
                    .query(&statement, &[])
                    .await
                    .with_context(|| format!("cannot read rows of source table {source}"))?;
                let Some(last_row) = rows.last() else { break };
                after = Some(
                    table
                        .primary_key
                        .iter()
                        .map(|&i| last_row.get::<_, Option<String>>(i).unwrap_or_default())
                        .collect(),
                );
                let count = rows.len();
                let decoded = rows.iter().map(|r| decode_row(table, r)).collect::<Result<Vec<_>, _>>()?;
                for (key, digest, finding) in verifier.check_rows(source, target, decoded).await? {
                    report.rows += 1;
                    if let Some(digest) = digest {
                        expected_keys.entry(target.clone()).or_default().insert(digest);
                    }
                    tally(&mut report, key, finding);
                }
                rows_read += count as u64;
                metrics::counter!(crate::metrics::VERIFY_ROWS_CHECKED_TOTAL, "table" => source.clone())
                    .increment(count as u64);
                if !args.background {
                    progress_line(source, report.rows, rows_read, total, started, &mut last_line);
                }
                throttle(args.max_rows_per_second, rows_read, started).await;
                if count < args.chunk_size && args.sample.is_none() {
                    break;
                }
            }
            reports.push(report);
        }
        Ok::<(), CommandError>(())
    };
    let outcome = pass.await;
    if !args.background && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    let end_lsn = current_lsn(verifier).await;
    if !args.background {
        verifier
            .sql
            .lock()
            .await
            .end_snapshot()
            .await
            .context("cannot end the snapshot of the source database")?;
    }
    outcome?;

    // Extra items: only in target tables whose every source table was verified whole.
    let mut foreigners = Vec::new();
    if args.sample.is_none() {
        let targets: HashSet<&String> = selected.iter().map(|(_, target)| target).collect();
        for target in targets {
            let sources: Vec<String> =
                verifier.pairs.iter().filter(|(_, t)| t == target).map(|(s, _)| s.clone()).collect();
            if !sources.iter().all(|m| selected.iter().any(|(s, _)| s == m)) {
                continue;
            }
            let expected = expected_keys.remove(target.as_str()).unwrap_or_default();
            if !args.background {
                eprintln!(
                    "verify: scanning target {target} for items no source row maps to ({} expected; a full scan)",
                    expected.len()
                );
            }
            let scan_started = Instant::now();
            let (extras, foreign) = match &verifier.side {
                Side::Dynamo(side) => side.extras(target, &sources, &expected, &verifier.tables).await?,
                Side::Postgres(side) => {
                    (side.extras(target, &sources, &expected, &verifier.tables).await?, None)
                }
            };
            foreigners.extend(foreign);
            if !args.background {
                eprintln!(
                    "verify: scanned {target} in {:.1} s: {} extra items",
                    scan_started.elapsed().as_secs_f64(),
                    extras.len()
                );
            }
            for (report_table, extra) in extras {
                let report = reports.iter_mut().find(|r| r.table == report_table).expect("verified table");
                report.extra += 1;
                report.extra_keys.push(extra);
            }
            for report in reports.iter_mut().filter(|r| &r.target == target) {
                report.extra_checked = true;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut report = Report {
        tables: reports,
        rows_per_second: rows_read as f64 / seconds.max(0.001),
        seconds,
        rechecked: false,
        recheck_note: None,
        foreign: foreigners,
    };
    // A key can be caught again by a write after the pass: re-check up to three times, each
    // time once the stream has passed the newest position. Real drift stays through all.
    let mut end = end_lsn;
    for _ in 0..3 {
        if report.differences() == 0 {
            break;
        }
        recheck(verifier, &mut report, end, args.recheck_timeout).await?;
        if !report.rechecked {
            break;
        }
        end = current_lsn(verifier).await;
    }
    Ok(report)
}

/// A progress line on standard error: rewritten in place on a terminal, else every ten
/// seconds; against the tables' estimated rows.
fn progress_line(
    table: &str,
    table_rows: u64,
    rows: u64,
    total: i64,
    started: Instant,
    last_line: &mut Instant,
) {
    let percent = if total > 0 { (100.0 * rows as f64 / total as f64).min(100.0) } else { 0.0 };
    let line = format!(
        "verify: {table} {table_rows} rows; {rows}/~{total} in all ({percent:.0}%), {:.0} rows/s",
        rows as f64 / started.elapsed().as_secs_f64().max(0.001)
    );
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!("\r{line}   ");
    } else if last_line.elapsed() >= std::time::Duration::from_secs(10) {
        eprintln!("{line}");
        *last_line = Instant::now();
    }
}

/// The reason given for an item without its version attribute.
pub(crate) const UNVERSIONED: &str =
    "the item has no version attribute (written or changed around sluice): the position guard \
     keeps the stream's writes from it; `sluice reconcile --force` rewrites it from the source";

fn tally(report: &mut TableReport, key: SourceKey, finding: Finding) {
    match finding {
        Finding::Matched => report.matched += 1,
        Finding::NotExpected => {}
        Finding::Untranslatable => report.untranslatable += 1,
        Finding::Missing => {
            report.missing += 1;
            report.missing_keys.push(key);
        }
        Finding::Different(attributes, values) => {
            report.different += 1;
            report.different_keys.push(Difference { key, attributes, values: Some(values), reason: None });
        }
        Finding::Unversioned(attributes, values) => {
            report.different += 1;
            report.different_keys.push(Difference {
                key,
                attributes,
                values: Some(values),
                reason: Some(UNVERSIONED.into()),
            });
        }
    }
}

async fn throttle(max_rows_per_second: u64, rows: u64, started: Instant) {
    if max_rows_per_second > 0 {
        let due = Duration::from_secs_f64(rows as f64 / max_rows_per_second as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}
