//! The way back for a DynamoDB target: `sluice run --reverse` reads the DynamoDB Streams of
//! the mapped tables and applies the application's writes to the old Postgres tables through
//! the mapping read backwards (`targets/dynamodb/inverse.rs`).
//!
//! ```text
//! StreamReader per DynamoDB table ──ShardBatch──▶ invert ──RowOps (phase-gated)──▶ Applier
//!   ▲ (shards in parallel, each in order,                  rows + shard positions, one transaction,
//!   │  children after their parents)                        old database, reverse origin
//!   └──────────── each shard's position at start ◀── migration.stream_checkpoint_table
//! ```
//!
//! - **Exactly once.** Each batch's rows and every touched shard's last sequence number commit
//!   in one transaction (`targets/postgres/apply.rs`, `Checkpoint::Shards`); a restart resumes
//!   each shard after its last applied record, and a lost commit is checked before a retry.
//! - **No loops.** The rows are written in a session with the reverse origin
//!   (`sluice_<slot>_reverse`): the forward stream drops them, and the old tables' fence
//!   lets them through. Records of sluice's own forward writes are skipped by their version.
//! - **Phases.** Only tables in `reversed` or `rolling_back` are applied (read again for each
//!   batch with something to apply, after its records were read, so that a record written
//!   after `finish` meets `finished`); the records of the others still advance their shard's
//!   position: before a cutover the stream holds only sluice's own forward writes.
//! - **Caught up.** A shard read to its current end records when (`read_to`), so that
//!   `rollback` and `finish` can wait until everything written before their fence is applied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_core::{Position, RetryPolicy, Shutdown};
use sluice_dynamodb::streams::sdk::StreamsClient;
use sluice_dynamodb::streams::{ShardBatch, StreamReader};
use sluice_dynamodb::DynamoClient;
use tokio::sync::mpsc;

use super::fence::origin_name;
use super::reverse::PhaseGate;
use super::Direction;
use crate::config::{Config, TargetConfig};
use crate::error::{CommandError, ErrorKind, TargetError};
use crate::targets::dead_letter::DeadLetter;
use crate::targets::dynamodb::apply::client_options;
use crate::targets::dynamodb::inverse::{Inverse, InverseMapping, Unmappable};
use crate::targets::dynamodb::mapping::Mapping;
use crate::targets::postgres::apply::{Applier, Checkpoint, Op, ShardPosition};
use crate::targets::postgres::translate::RowOp;
use crate::targets::{Sourced, TargetStats};
use crate::translate::mapping::MappingFile;

/// The stream view the way back needs: the item before and after each change.
pub const NEEDED_VIEW: &str = "NEW_AND_OLD_IMAGES";

/// The way back's pipeline name: the forward one's, `-reverse`.
pub fn pipeline_name(config: &Config) -> String {
    format!("{}-reverse", config.pipeline.name)
}

/// The mapping of a DynamoDB target, or why the way back cannot use it.
pub(crate) fn mapping(config: &Config) -> Result<Mapping, CommandError> {
    let TargetConfig::Dynamodb(dynamo) = &config.target else {
        return Err(CommandError::invalid("the way back from DynamoDB needs a DynamoDB target"));
    };
    let Some(path) = &dynamo.mapping else {
        return Err(CommandError::invalid(
            "the way back needs target.mapping: an outbox event log has no way back",
        ));
    };
    let mapping = Mapping::load(path).map_err(|p| {
        CommandError::invalid(p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    })?;
    let problems = crate::targets::dynamodb::inverse::offline_problems(&mapping);
    if !problems.is_empty() {
        return Err(CommandError::invalid(format!(
            "the mapping {} cannot be read backwards: {}",
            path.display(),
            problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(mapping)
}

/// Each mapped DynamoDB table's stream ARN; a table without a stream, or with a stream that
/// does not carry both images, is an error naming the table and the setting.
pub async fn streams(client: &DynamoClient, tables: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut arns = Vec::new();
    for table in tables {
        let how = format!(
            "aws dynamodb update-table --table-name {table} --stream-specification StreamEnabled=true,StreamViewType={NEEDED_VIEW}"
        );
        match client.stream_of(table).await {
            Ok(Some(stream)) if stream.view_type == NEEDED_VIEW => arns.push((table.to_string(), stream.arn)),
            Ok(Some(stream)) => {
                return Err(format!(
                    "DynamoDB table {table} streams {} records; the way back needs {NEEDED_VIEW} (StreamViewType): \
                     a stream's view cannot change, so disable the stream and enable it again: {how}",
                    stream.view_type
                ))
            }
            Ok(None) => {
                return Err(format!(
                    "DynamoDB table {table} has no stream enabled; the way back reads it: {how}"
                ))
            }
            Err(e) => return Err(format!("cannot describe DynamoDB table {table}: {e}")),
        }
    }
    Ok(arns)
}

fn fatal(message: String) -> TargetError {
    TargetError { target: "dynamodb-streams", kind: ErrorKind::Fatal, message, source: None }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Runs the way back of `config` (the forward configuration, with a DynamoDB target) until
/// `shutdown` or a fatal error. `stats` counts the rows applied and dead-lettered; `source`
/// says `streaming` while the streams are read (for `/readyz`).
pub async fn run(
    config: &Config,
    stats: Arc<TargetStats>,
    source: Arc<sluice_postgres::SourceStats>,
    shutdown: Shutdown,
) -> Result<(), TargetError> {
    let mapping = mapping(config).map_err(|e| fatal(e.to_string()))?;
    let TargetConfig::Dynamodb(dynamo) = &config.target else { unreachable!("mapping checked the target") };
    let Some(forward) = config.source.replication() else {
        return Err(fatal("the way back needs a logical replication source ([source.replication])".into()));
    };
    let pipeline = pipeline_name(config);
    let retry = RetryPolicy::new(config.pipeline.retry_for);

    // The old tables, as the old database's catalog describes them.
    let sql = sluice_postgres::connect_sql(&config.source.connection).await.map_err(|e| TargetError {
        target: "postgres",
        kind: ErrorKind::Fatal,
        message: "cannot connect to the old database (source.connection)".into(),
        source: Some(Box::new(e)),
    })?;
    let mut tables = HashMap::new();
    for (i, table) in mapping.tables.iter().enumerate() {
        if tables.contains_key(table.source.as_str()) {
            continue;
        }
        let found = crate::targets::postgres::catalog::target_table(
            &sql,
            &table.source,
            &format!("target.mapping tables[{i}].source"),
        )
        .await?;
        tables.insert(Arc::<str>::from(table.source.as_str()), found);
    }
    drop(sql);
    let catalog: HashMap<String, sluice_postgres::catalog::Table> =
        tables.iter().map(|(name, t)| (name.to_string(), t.table.clone())).collect();
    let inverse = InverseMapping::new(&mapping, &catalog).map_err(fatal)?;

    let options = client_options(dynamo);
    let client = DynamoClient::connect(&options).await;
    let streams = streams(&client, &inverse.dynamodb_tables()).await.map_err(fatal)?;

    let dead_letter_path = dynamo.dead_letter.as_deref().map(super::reverse::reverse_dead_letter);
    let dead_letter = Arc::new(DeadLetter::open("postgres", dead_letter_path, Arc::clone(&stats)).await?);
    let mut applier = Applier::for_shards(
        &config.source.connection,
        &origin_name(&forward.slot, Direction::Reverse),
        tables,
        &config.migration.stream_checkpoint_table,
        &pipeline,
        config.pipeline.retry_for,
        Arc::clone(&dead_letter),
        Arc::clone(&stats),
    )
    .await?;
    let stored = applier.stored_shards().await?;
    let mut gate = PhaseGate::of_old_tables(
        &config.source.connection,
        &config.migration,
        &config.pipeline.name,
        mapping.tables.iter().map(|t| t.source.clone()),
        retry,
    )
    .await
    .map_err(fatal)?;

    // One reader per DynamoDB table; their batches meet on one channel, tagged by table.
    let (tx, mut rx) = mpsc::channel::<(usize, ShardBatch)>(8);
    let mut readers = tokio::task::JoinSet::new();
    for (index, (table, arn)) in streams.iter().enumerate() {
        let positions: BTreeMap<String, String> = stored
            .iter()
            .filter(|s| s.stream_arn == *arn && !s.finished)
            .filter_map(|s| Some((s.shard.clone(), s.sequence.clone()?)))
            .collect();
        let finished: Vec<String> =
            stored.iter().filter(|s| s.stream_arn == *arn && s.finished).map(|s| s.shard.clone()).collect();
        tracing::info!(table = %table, stream = %arn, resumed_shards = positions.len(), finished_shards = finished.len(), "reading the table's stream");
        let api = Arc::new(StreamsClient::connect(&options, table).await);
        let reader = StreamReader::new(api, table, arn, positions, finished, retry);
        let (shard_tx, mut shard_rx) = mpsc::channel(4);
        readers.spawn(reader.run(shard_tx, shutdown.clone()));
        let tx = tx.clone();
        readers.spawn(async move {
            while let Some(batch) = shard_rx.recv().await {
                if tx.send((index, batch)).await.is_err() {
                    break;
                }
            }
            Ok(())
        });
    }
    drop(tx);
    source.streaming.store(true, std::sync::atomic::Ordering::Relaxed);
    let _not_streaming = NotStreaming(Arc::clone(&source));

    let most = config.pipeline.batch_max_events.max(1);
    let mut shutdown = shutdown;
    loop {
        let first = tokio::select! {
            _ = shutdown.requested() => return Ok(()),
            ended = readers.join_next(), if !readers.is_empty() => match ended {
                Some(Ok(Ok(()))) | None => continue,
                Some(Ok(Err(e))) => return Err(fatal(e.to_string())),
                Some(Err(join)) => return Err(fatal(format!("a stream reader failed: {join}"))),
            },
            batch = rx.recv() => match batch {
                Some(batch) => batch,
                None => return Ok(()),
            },
        };
        let mut batches = vec![first];
        let mut records = batches[0].1.records.len();
        while records < most {
            match rx.try_recv() {
                Ok(batch) => {
                    records += batch.1.records.len();
                    batches.push(batch);
                }
                Err(_) => break,
            }
        }
        apply_batches(&batches, &streams, &inverse, &mut gate, &mut applier, &dead_letter).await?;
    }
}

/// Says the way back no longer streams when it ends, however it ends.
struct NotStreaming(Arc<sluice_postgres::SourceStats>);

impl Drop for NotStreaming {
    fn drop(&mut self) {
        self.0.streaming.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the records of one transaction came to, by DynamoDB table and outcome.
type Outcomes = BTreeMap<(String, &'static str), u64>;

/// Inverts the batches' records, drops the tables that do not stream back, and applies the
/// rest with every touched shard's position in one transaction.
async fn apply_batches(
    batches: &[(usize, ShardBatch)],
    streams: &[(String, String)],
    inverse: &InverseMapping,
    gate: &mut PhaseGate,
    applier: &mut Applier,
    dead_letter: &DeadLetter,
) -> Result<(), TargetError> {
    let mut outcomes = Outcomes::new();
    let mut positions: BTreeMap<String, ShardPosition> = BTreeMap::new();
    // (DynamoDB table, old table, operations) in stream order; poison records apart.
    let mut placed: Vec<(usize, Arc<str>, Vec<RowOp>)> = Vec::new();
    let mut poison: Vec<(usize, &ShardBatch, usize, Unmappable)> = Vec::new();
    let mut newest: BTreeMap<usize, f64> = BTreeMap::new();
    for (index, batch) in batches {
        let (table, arn) = &streams[*index];
        let position = positions.entry(batch.shard.clone()).or_insert_with(|| ShardPosition {
            stream_arn: arn.clone(),
            shard: batch.shard.clone(),
            sequence: None,
            finished: false,
            read_to: None,
        });
        for (n, record) in batch.records.iter().enumerate() {
            position.sequence = Some(record.sequence_number.clone());
            if let Some(created) = record.created_at {
                let at = newest.entry(*index).or_insert(created);
                *at = at.max(created);
            }
            let outcome = match inverse.invert(table, record) {
                Ok(Inverse::Apply(old, ops)) => {
                    placed.push((*index, old, ops));
                    continue;
                }
                Ok(Inverse::Own) => "own",
                Ok(Inverse::Foreign) => "foreign",
                Ok(Inverse::Unchanged) => "unchanged",
                Err(unmappable) => {
                    poison.push((*index, batch, n, unmappable));
                    continue;
                }
            };
            *outcomes.entry((table.clone(), outcome)).or_default() += 1;
        }
        position.finished |= batch.finished;
        if let Some(read_to) = batch.read_to {
            position.read_to = Some(unix_seconds(read_to));
        }
    }
    // The phases are read again after the records were: a record written after a table moved
    // (a `finish`, a `rollback`) meets the new phase.
    let blocked = |gate: &PhaseGate, old: Option<&str>| old.is_some_and(|t| !gate.allowed(t));
    if !placed.is_empty() || !poison.is_empty() {
        gate.refresh().await.map_err(fatal)?;
    }
    let mut ops: Vec<Op> = Vec::new();
    for (index, old, row_ops) in placed {
        let table = &streams[index].0;
        if !gate.allowed(&old) {
            *outcomes.entry((table.clone(), "skipped")).or_default() += 1;
            metrics::counter!(crate::metrics::REVERSE_SKIPPED_TOTAL, "table" => old.to_string()).increment(1);
            continue;
        }
        *outcomes.entry((table.clone(), "applied")).or_default() += 1;
        ops.extend(row_ops.into_iter().map(|op| Sourced {
            op,
            position: Position::default(),
            source: Arc::clone(&old),
        }));
    }
    for (index, batch, n, unmappable) in poison {
        let table = &streams[index].0;
        if blocked(gate, unmappable.table.as_deref()) {
            *outcomes.entry((table.clone(), "skipped")).or_default() += 1;
            continue;
        }
        *outcomes.entry((table.clone(), "dead_letter")).or_default() += 1;
        let record = &batch.records[n];
        let details = |line: &mut Vec<u8>| {
            line.extend_from_slice(b",\"dynamodb_table\":");
            crate::json::string(line, table);
            line.extend_from_slice(b",\"shard\":");
            crate::json::string(line, &batch.shard);
            line.extend_from_slice(b",\"sequence_number\":");
            crate::json::string(line, &record.sequence_number);
            line.extend_from_slice(b",\"key\":{");
            for (i, (name, attr)) in record.keys.iter().enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                crate::json::string(line, name);
                line.push(b':');
                crate::json::string(line, &attr.to_string());
            }
            line.push(b'}');
        };
        dead_letter
            .record(
                Position::default(),
                unmappable.table.as_deref().unwrap_or(table),
                Some(&details),
                &unmappable.to_string(),
            )
            .await?;
    }
    applier.apply(&ops, &Checkpoint::Shards(positions.into_values().collect())).await?;
    for ((table, outcome), n) in outcomes {
        metrics::counter!(crate::metrics::REVERSE_RECORDS_TOTAL, "table" => table, "outcome" => outcome)
            .increment(n);
    }
    let now = unix_seconds(SystemTime::now());
    for (index, created) in newest {
        metrics::gauge!(crate::metrics::REVERSE_LAG_SECONDS, "table" => streams[index].0.clone())
            .set((now - created).max(0.0));
    }
    Ok(())
}

/// How far the way back has read each mapped DynamoDB table's stream: the oldest `read_to` of
/// its unfinished shards (every record written before it is applied), or `None` when a shard
/// has not been read to its end yet. Read from the stream checkpoint table.
pub async fn read_to(
    sql: &tokio_postgres::Client,
    config: &Config,
    stream_arns: &BTreeSet<String>,
) -> Result<Option<f64>, tokio_postgres::Error> {
    let table = config.migration.stream_checkpoint_table.quoted();
    let exists: bool = sql.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
    if !exists {
        return Ok(None);
    }
    let rows = sql
        .query(
            &format!(
                "SELECT stream_arn, extract(epoch FROM read_to)::float8 FROM {table} WHERE pipeline = $1 AND NOT finished"
            ),
            &[&pipeline_name(config)],
        )
        .await?;
    let mut oldest: Option<f64> = None;
    let mut seen = BTreeSet::new();
    for row in rows {
        let arn: String = row.get(0);
        if !stream_arns.contains(&arn) {
            continue;
        }
        let Some(at) = row.get::<_, Option<f64>>(1) else { return Ok(None) };
        seen.insert(arn);
        oldest = Some(oldest.map_or(at, |o: f64| o.min(at)));
    }
    // A stream whose shards the way back has not recorded at all has not been read.
    if seen.len() < stream_arns.len() {
        return Ok(None);
    }
    Ok(oldest)
}

/// How long after a fence the way back's `read_to` must reach before the drain counts as
/// done: records reach the stream within moments of their write.
pub const STREAM_SETTLE: Duration = Duration::from_secs(2);
