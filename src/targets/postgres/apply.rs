//! The Postgres target: applies each batch's row operations (`translate::postgres`) to the
//! target database in one transaction, together with the pipeline's checkpoint row.
//!
//! Exactly once, in order: one worker applies batches in source order on one connection. The
//! checkpoint table holds, per pipeline, the position of the last change applied, written in
//! the same transaction as the rows, so rows and checkpoint commit together or not at all.
//! After a crash the source replays from its confirmed position and every change at or below
//! the checkpoint is skipped; the rest applies once. Positions are unique per change (the rows
//! of a backfill chunk take consecutive ordinals after their high watermark's, since a chunk
//! larger than `pipeline.batch_max_events` comes in several batches). Writes are upserts and
//! deletes by the target table's primary key, so even a checkpoint lost with its table
//! converges on replay.
//!
//! One round trip per batch: the statements (multi-row upserts, deletes by key lists, updates
//! of partial rows) go as one simple-query text with values as escaped literals cast to the
//! target column types.
//!
//! Failures: a lost connection, a deadlock, a serialization failure or a server shutting down
//! is retried with backoff for `retry_for` (the checkpoint is read again after reconnecting:
//! the commit may have landed). A row the target refuses (SQLSTATE classes 22 and 23: a value
//! its column type rejects, a constraint) makes the batch apply again change by change under
//! savepoints: the refused changes go to the dead-letter store, named by SQLSTATE, constraint
//! and column (never the server's message, which quotes values), and the rest commits. Any
//! other error (a missing table or column, no permission) stops the pipeline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::{Backoff, Lsn, RetryPolicy};
use sluice_postgres::catalog::quote_literal;
use sluice_postgres::setup::quote_ident;
use sluice_postgres::ConnectionConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::SimpleQueryMessage;

use super::catalog::{owned_sequences, target_keys, target_tables, OwnedSequence, TargetTable};
use super::error::{classify, fatal, refusal, sql_error, TARGET};
use crate::error::{ErrorKind, TargetError};
use crate::targets::dead_letter::DeadLetter;
use crate::targets::postgres::config::PostgresTargetConfig;
use crate::targets::postgres::translate::{PgTranslator, RowOp, Text};
use crate::targets::{OpBatch, Receipt, Sourced, Target, TargetStats};
use sluice_core::Position;

/// A checkpoint row's position, or why it is not one.
fn checkpoint_position(commit_lsn: &str, tx_ordinal: i64) -> Result<Position, String> {
    let commit_lsn =
        commit_lsn.parse::<Lsn>().map_err(|_| format!("commit_lsn {commit_lsn:?} is not an LSN"))?;
    let tx_ordinal =
        u32::try_from(tx_ordinal).map_err(|_| format!("tx_ordinal {tx_ordinal} is not an ordinal"))?;
    Ok(Position { commit_lsn, tx_ordinal })
}

/// What a batch's transaction writes beside its rows, so that both commit together or not at
/// all.
#[derive(Clone, Debug)]
pub(crate) enum Checkpoint {
    /// The pipeline's source position (`target.checkpoint_table`).
    Position(Position),
    /// Stream positions per shard (the way back from DynamoDB Streams).
    Shards(Vec<ShardPosition>),
    /// The position of the last change applied from one partition of a Kafka source, in the
    /// pipeline's table under the row name `<pipeline>:<topic>/<partition>`.
    Partition {
        /// The row's name.
        name: String,
        /// The last change applied.
        last: Position,
    },
}

/// A shard's progress, as the way back from DynamoDB records it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ShardPosition {
    /// The stream the shard belongs to.
    pub stream_arn: String,
    /// The shard id.
    pub shard: String,
    /// The sequence number of the last record applied (or skipped); `None` when none new.
    pub sequence: Option<String>,
    /// The shard is closed and read to its end.
    pub finished: bool,
    /// Every record written before this time (seconds since the epoch) has been read: the
    /// time of the last read that found the shard at its end.
    pub read_to: Option<f64>,
}

/// The columns of the shard checkpoint table (`migration.stream_checkpoint_table`).
pub(crate) const SHARD_CHECKPOINT_COLUMNS: &str =
    "(pipeline text NOT NULL, shard text NOT NULL, stream_arn text NOT NULL, \
     sequence_number numeric, finished boolean NOT NULL DEFAULT false, read_to timestamptz, \
     updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, shard))";

/// Rows per multi-row statement.
const ROWS_PER_STATEMENT: usize = 500;

pub struct PgTarget {
    jobs: mpsc::Sender<Job>,
    /// The checkpoint as the applier last committed (or read) it.
    applied: Arc<std::sync::Mutex<Position>>,
    /// The apply task: when it ends early (a failed batch, or a panic) the next submit says
    /// why; dropping the target stops it (an open transaction rolls back).
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for PgTarget {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A batch to apply and where its outcome goes.
type Job = (OpBatch<RowOp>, oneshot::Sender<Result<(), TargetError>>);

/// An operation with where it came from, for the checkpoint and dead-letter entries.
pub(crate) type Op = Sourced<RowOp>;

pub(crate) struct Applier {
    connection: ConnectionConfig,
    /// The replication origin of the apply session.
    origin: String,
    client: Option<tokio_postgres::Client>,
    tables: HashMap<Arc<str>, TargetTable>,
    /// With `sync_sequences`: the sequences to advance, by target table.
    sequences: HashMap<Arc<str>, Vec<OwnedSequence>>,
    checkpoint_table: String,
    /// The checkpoint table holds shard positions (the way back from DynamoDB).
    shards: bool,
    pipeline: String,
    /// The position of the last change applied (from the checkpoint table).
    applied: Position,
    /// `applied`, for the pipeline to skip what is applied before translating it.
    shared_applied: Arc<std::sync::Mutex<Position>>,
    /// With a Kafka source: per partition, the assignment generation its checkpoint was read
    /// under and the position of the last change applied from it.
    partitions: HashMap<(Arc<str>, i32), (u64, Position)>,
    retry_for: Duration,
    lock_timeout: Duration,
    dead_letter: Arc<DeadLetter>,
    stats: Arc<TargetStats>,
}

impl PgTarget {
    /// Connects, checks the mapping against the target tables, creates the checkpoint table
    /// when missing and reads this pipeline's checkpoint; the target and its translator (which
    /// needs the target tables' keys).
    pub async fn open(
        config: &PostgresTargetConfig,
        pipeline: &str,
        origin: &str,
        stats: Arc<TargetStats>,
        dead_letter: Arc<DeadLetter>,
    ) -> Result<(PgTranslator, Self), TargetError> {
        let mapping = config.load_mapping().map_err(|problems| {
            fatal(format!(
                "target.mapping {}: {}",
                config.mapping.display(),
                problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            ))
        })?;
        let origin = origin.to_owned();
        let client = open_session(config, &origin).await?;
        let tables = target_tables(&client, &mapping).await?;
        let sequences =
            if config.sync_sequences { owned_sequences(&client, &tables).await? } else { HashMap::new() };
        let checkpoint_table = config.checkpoint_table.quoted();
        sluice_postgres::setup::create_table_if_missing(
            &client,
            &checkpoint_table,
            "(pipeline text PRIMARY KEY, commit_lsn pg_lsn NOT NULL, tx_ordinal int8 NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
            .map_err(|e| sql_error(&format!("cannot create the checkpoint table {} (target.checkpoint_table)", config.checkpoint_table), e))?;
        let mut applier = Applier {
            connection: config.connection.clone(),
            origin,
            client: Some(client),
            tables,
            sequences,
            checkpoint_table,
            shards: false,
            pipeline: pipeline.to_owned(),
            applied: Position::default(),
            shared_applied: Arc::default(),
            partitions: HashMap::new(),
            retry_for: config.retry_for,
            lock_timeout: config.lock_timeout,
            dead_letter,
            stats,
        };
        let translator = PgTranslator::new(&mapping, &target_keys(&applier.tables));
        applier.applied = applier.read_checkpoint().await?;
        applier.publish_applied();
        tracing::info!(pipeline, commit_lsn = %applier.applied.commit_lsn, ordinal = applier.applied.tx_ordinal, "postgres target checkpoint");
        let applied = Arc::clone(&applier.shared_applied);
        let (jobs, mut rx) = mpsc::channel::<Job>(4);
        let task = tokio::spawn(async move {
            while let Some((batch, done)) = rx.recv().await {
                crate::faults::panic_at("postgres-applier");
                let result = applier.apply_batch(batch).await;
                let failed = result.is_err();
                let _ = done.send(result);
                if failed {
                    break;
                }
            }
        });
        Ok((translator, PgTarget { jobs, applied, task: Some(task) }))
    }
}

/// The first session, retried within `target.retry_for` while the target is unreachable or
/// restarting (a pod may start during a network outage); a refusal (authentication, a missing
/// database, TLS) is fatal at once.
async fn open_session(
    config: &PostgresTargetConfig,
    origin: &str,
) -> Result<tokio_postgres::Client, TargetError> {
    let policy =
        RetryPolicy::new(config.retry_for).with_delays(Duration::from_millis(100), Duration::from_secs(5));
    sluice_core::retry::retry(
        policy,
        &sluice_core::Shutdown::never(),
        "postgres target: opening a session on the target database (target.connection)",
        || connect(&config.connection, config.lock_timeout, origin),
        |_| {},
    )
    .await
    .map_err(|gave_up| TargetError {
        target: TARGET,
        kind: ErrorKind::Fatal,
        message: "cannot open a session on the target database (target.connection)".into(),
        source: match gave_up {
            sluice_core::GaveUp::Failed { error, .. } => Some(Box::new(error)),
            sluice_core::GaveUp::Shutdown => None,
        },
    })
}

/// A session for applying changes. A lock held on a target table (a migration's DDL) makes a
/// statement fail after `lock_timeout` and the batch retry, with a warning each time, instead
/// of waiting silently.
///
/// The session carries the replication origin `origin` (`sluice_<slot>_forward`; none when
/// empty) where the role may set one up: a reverse stream reading this database then drops sluice's own writes
/// (no loops), and a fence on these tables would refuse them. Without the right it applies
/// all the same and says once what is missing.
async fn connect(
    config: &ConnectionConfig,
    lock_timeout: Duration,
    origin: &str,
) -> sluice_postgres::Result<tokio_postgres::Client> {
    let client = sluice_postgres::connect_sql(config).await?;
    client.batch_execute(&format!("SET lock_timeout = {}", lock_timeout.as_millis().max(1))).await?;
    // A batch counts as durable once its commit returns, and the slot is confirmed past it:
    // with synchronous_commit off that commit can still vanish in a server crash (the fault
    // soak lost 27 transactions to immediate restarts so). Stricter settings are kept.
    client
        .batch_execute(
            "SELECT set_config('synchronous_commit', 'on', false) WHERE current_setting('synchronous_commit') = 'off'",
        )
        .await?;
    // An applier in a consumer group ([source.kafka]) has no origin: its members write the
    // target at the same time, and an origin is held by one session only.
    if origin.is_empty() {
        return Ok(client);
    }
    let may: bool = client
        .query_one(
            "SELECT has_function_privilege('pg_catalog.pg_replication_origin_session_setup(text)', 'EXECUTE') \
               AND has_function_privilege('pg_catalog.pg_replication_origin_create(text)', 'EXECUTE')",
            &[],
        )
        .await?
        .get(0);
    if !may {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                origin,
                "postgres target: the role may not set up a replication origin, so a reverse stream from this \
                 database could not tell sluice's own writes apart: GRANT EXECUTE ON FUNCTION \
                 pg_replication_origin_create(text), pg_replication_origin_session_setup(text) TO the target role"
            )
        });
        return Ok(client);
    }
    // A session of a process that just died may still hold the origin for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match crate::migration::fence::as_origin_named(&client, origin).await {
            Ok(()) => return Ok(client),
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && std::time::Instant::now() < deadline =>
            {
                tracing::info!(
                    origin,
                    "postgres target: the replication origin is still held by an ended session; waiting"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::CONFIGURATION_LIMIT_EXCEEDED) => {
                return Err(sluice_postgres::Error::Setup(format!(
                    "cannot set up replication origin {origin:?} on the target: every replication-origin \
                     state slot of the target server is taken ({}); raise max_active_replication_origins \
                     (Postgres 18+) or max_replication_slots (before 18) there, or drop the origins no \
                     longer used (pg_replication_origin_drop)",
                    sluice_postgres::error::Chain(&e)
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Target for PgTarget {
    type Op = RowOp;

    fn applied_through(&self) -> Option<Position> {
        Some(*self.applied.lock().unwrap_or_else(|e| e.into_inner()))
    }

    async fn submit(&mut self, batch: OpBatch<RowOp>) -> Result<Receipt, TargetError> {
        let (done, receipt) = oneshot::channel();
        if self.jobs.send((batch, done)).await.is_err() {
            // The task dropped its queue: it has ended, or is unwinding.
            let ended = match self.task.take() {
                Some(task) => task.await,
                None => Ok(()),
            };
            return Err(match ended {
                Err(error) if error.is_panic() => fatal("the apply task panicked"),
                _ => fatal("the apply task stopped"),
            });
        }
        // A panic drops the batch's sender: its receipt fails rather than waiting forever.
        Ok(Box::pin(async move {
            receipt.await.unwrap_or_else(|_| Err(fatal("the apply task stopped before applying this batch")))
        }))
    }
}

/// A shard's row in the shard checkpoint table.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredShard {
    pub shard: String,
    pub stream_arn: String,
    /// The last sequence number applied, as decimal text.
    pub sequence: Option<String>,
    pub finished: bool,
}

impl Applier {
    /// The applier of the way back from DynamoDB: rows into `tables` of the old database, in
    /// sessions with the replication origin `origin`, shard positions in `checkpoint_table`
    /// (created when missing) under `pipeline`.
    #[expect(clippy::too_many_arguments, reason = "the applier's parts, each named")]
    pub(crate) async fn for_shards(
        connection: &ConnectionConfig,
        origin: &str,
        tables: HashMap<Arc<str>, TargetTable>,
        checkpoint_table: &sluice_core::TableName,
        pipeline: &str,
        retry_for: Duration,
        dead_letter: Arc<DeadLetter>,
        stats: Arc<TargetStats>,
    ) -> Result<Self, TargetError> {
        let lock_timeout = Duration::from_secs(10);
        let client = connect(connection, lock_timeout, origin).await.map_err(|e| TargetError {
            target: TARGET,
            kind: ErrorKind::Fatal,
            message: "cannot connect to the old database (source.connection)".into(),
            source: Some(Box::new(e)),
        })?;
        let quoted = checkpoint_table.quoted();
        sluice_postgres::setup::create_table_if_missing(&client, &quoted, SHARD_CHECKPOINT_COLUMNS)
            .await
            .map_err(|e| {
                sql_error(
                    &format!(
                        "cannot create the stream checkpoint table {checkpoint_table} (migration.stream_checkpoint_table)"
                    ),
                    e,
                )
            })?;
        Ok(Applier {
            connection: connection.clone(),
            origin: origin.to_owned(),
            client: Some(client),
            tables,
            sequences: HashMap::new(),
            checkpoint_table: quoted,
            shards: true,
            pipeline: pipeline.to_owned(),
            applied: Position::default(),
            shared_applied: Arc::default(),
            partitions: HashMap::new(),
            retry_for,
            lock_timeout,
            dead_letter,
            stats,
        })
    }

    /// The shard positions this pipeline recorded; rows of shards finished more than two days
    /// ago (past the stream's 24 h retention, never listed again) are deleted first.
    pub(crate) async fn stored_shards(&mut self) -> Result<Vec<StoredShard>, TargetError> {
        if self.client.is_none() {
            self.reconnect().await?;
        }
        let client = self.client()?;
        let table = &self.checkpoint_table;
        let read = async {
            client
                .execute(
                    &format!(
                        "DELETE FROM {table} WHERE pipeline = $1 AND finished AND updated_at < now() - interval '2 days'"
                    ),
                    &[&self.pipeline],
                )
                .await?;
            client
                .query(
                    &format!(
                        "SELECT shard, stream_arn, sequence_number::text, finished FROM {table} WHERE pipeline = $1"
                    ),
                    &[&self.pipeline],
                )
                .await
        };
        let rows = read
            .await
            .map_err(|e| sql_error(&format!("cannot read the stream checkpoints from {table}"), e))?;
        Ok(rows
            .iter()
            .map(|r| StoredShard {
                shard: r.get(0),
                stream_arn: r.get(1),
                sequence: r.get(2),
                finished: r.get(3),
            })
            .collect())
    }
}

impl Applier {
    /// This pipeline's checkpoint; a row sluice cannot read is an error naming the table and
    /// the pipeline (read as "nothing applied", it would apply everything again).
    async fn read_checkpoint(&self) -> Result<Position, TargetError> {
        if self.client.is_none() {
            return Ok(self.applied);
        }
        self.read_checkpoint_named(&self.pipeline).await
    }

    /// The checkpoint row `name` (the pipeline's, or one of its partitions').
    async fn read_checkpoint_named(&self, name: &str) -> Result<Position, TargetError> {
        let client = self.client()?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT commit_lsn::text, tx_ordinal FROM {} WHERE pipeline = $1",
                    self.checkpoint_table
                ),
                &[&name],
            )
            .await
            .map_err(|e| {
                sql_error(&format!("cannot read the checkpoint from {}", self.checkpoint_table), e)
            })?;
        match row {
            Some(row) => checkpoint_position(&row.get::<_, String>(0), row.get::<_, i64>(1)).map_err(|reason| {
                fatal(format!(
                    "the checkpoint of pipeline {name:?} in {} is corrupt ({reason}); fix or delete that row (deleting it re-applies every change the source replays)",
                    self.checkpoint_table
                ))
            }),
            None => Ok(Position::default()),
        }
    }

    fn publish_applied(&self) {
        *self.shared_applied.lock().unwrap_or_else(|e| e.into_inner()) = self.applied;
    }

    /// Applies the operations past the checkpoint in one transaction.
    async fn apply_batch(&mut self, batch: OpBatch<RowOp>) -> Result<(), TargetError> {
        if let Some(slice) = batch.slice {
            return self.apply_partition_batch(slice, batch.ops).await;
        }
        let applied = self.applied;
        let ops: Vec<Op> = batch.ops.into_iter().filter(|op| op.position > applied).collect();
        let Some(last) = ops.last().map(|op| op.position) else { return Ok(()) };
        self.apply(&ops, &Checkpoint::Position(last)).await
    }

    /// A Kafka source's batch (one partition's records): the operations past that partition's
    /// checkpoint, in one transaction with it. The checkpoint is read again whenever the
    /// partition was assigned anew, since another applier may have owned it meanwhile.
    async fn apply_partition_batch(
        &mut self,
        slice: sluice_core::LogSlice,
        ops: Vec<Op>,
    ) -> Result<(), TargetError> {
        let name = format!("{}:{}/{}", self.pipeline, slice.topic, slice.partition);
        let key = (Arc::clone(&slice.topic), slice.partition);
        let applied = match self.partitions.get(&key) {
            Some((generation, applied)) if *generation == slice.generation => *applied,
            _ => {
                let applied = self.read_partition_checkpoint(&name).await?;
                self.partitions.insert(key.clone(), (slice.generation, applied));
                applied
            }
        };
        let ops: Vec<Op> = ops.into_iter().filter(|op| op.position > applied).collect();
        let Some(last) = ops.last().map(|op| op.position) else { return Ok(()) };
        self.apply(&ops, &Checkpoint::Partition { name, last }).await?;
        self.partitions.insert(key, (slice.generation, last));
        Ok(())
    }

    /// A partition's checkpoint, read with the same retries as a batch.
    async fn read_partition_checkpoint(&mut self, name: &str) -> Result<Position, TargetError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(
            RetryPolicy::new(self.retry_for).with_delays(Duration::from_millis(50), Duration::from_secs(5)),
        );
        loop {
            let error = match self.read_checkpoint_named(name).await {
                Ok(position) => return Ok(position),
                Err(error) => error,
            };
            if error.kind != ErrorKind::Transient || started.elapsed() >= self.retry_for {
                return Err(error);
            }
            let delay = backoff.next_delay().unwrap_or(Duration::from_secs(5));
            tracing::warn!(error = %error, checkpoint = name, "postgres target: cannot read a partition's checkpoint; retrying");
            self.client = None;
            tokio::time::sleep(delay).await;
            self.reconnect().await?;
        }
    }

    /// Applies `ops` and writes `checkpoint` in one transaction: all of it, or (when the
    /// target refuses a row) each operation under a savepoint with the refused ones
    /// dead-lettered. A lost connection or another transient failure is retried for
    /// `retry_for`, after checking whether the lost commit landed.
    pub(crate) async fn apply(&mut self, ops: &[Op], checkpoint: &Checkpoint) -> Result<(), TargetError> {
        let started = Instant::now();
        // The budget is `retry_for` from `started`, checked below; the delays are the policy's.
        let mut backoff = Backoff::new(
            RetryPolicy::new(self.retry_for).with_delays(Duration::from_millis(50), Duration::from_secs(5)),
        );
        let mut careful = false;
        loop {
            let result = if careful {
                self.apply_each(ops, checkpoint).await
            } else {
                self.apply_all(ops, checkpoint).await
            };
            let error = match result {
                Ok(()) => {
                    if let Checkpoint::Position(last) = checkpoint {
                        self.applied = *last;
                        self.publish_applied();
                    }
                    return Ok(());
                }
                Err(error) => error,
            };
            match error.kind {
                ErrorKind::Poison if !careful => careful = true,
                ErrorKind::Transient if started.elapsed() < self.retry_for => {
                    let delay = backoff.next_delay().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(
                        error = %error,
                        retry_in_ms = delay.as_millis() as u64,
                        gives_up_in_s = self.retry_for.saturating_sub(started.elapsed()).as_secs(),
                        "postgres target: the batch failed; retrying (target.retry_for)"
                    );
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.client = None;
                    tokio::time::sleep(delay).await;
                    if let Err(error) = self.reconnect().await {
                        if error.kind != ErrorKind::Transient {
                            return Err(error);
                        }
                        continue;
                    }
                    // The lost commit may have landed.
                    if self.landed(checkpoint).await? {
                        self.publish_applied();
                        return Ok(());
                    }
                }
                _ => return Err(error),
            }
        }
    }

    /// Whether the checkpoint table holds `checkpoint` already (read after reconnecting).
    async fn landed(&self, checkpoint: &Checkpoint) -> Result<bool, TargetError> {
        match checkpoint {
            Checkpoint::Position(last) => Ok(self.applied >= *last),
            Checkpoint::Partition { name, last } => match self.client {
                Some(_) => Ok(self.read_checkpoint_named(name).await? >= *last),
                None => Ok(false),
            },
            Checkpoint::Shards(shards) => {
                let Some(shard) = shards.iter().find(|s| s.sequence.is_some()) else { return Ok(false) };
                let Some(client) = &self.client else { return Ok(false) };
                let row = client
                    .query_opt(
                        &format!(
                            "SELECT sequence_number >= $3::text::numeric FROM {} WHERE pipeline = $1 AND shard = $2",
                            self.checkpoint_table
                        ),
                        &[&self.pipeline, &shard.shard, &shard.sequence],
                    )
                    .await
                    .map_err(|e| sql_error(&format!("cannot read the checkpoint from {}", self.checkpoint_table), e))?;
                Ok(row.and_then(|r| r.get::<_, Option<bool>>(0)).unwrap_or(false))
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), TargetError> {
        let client = match connect(&self.connection, self.lock_timeout, &self.origin).await {
            Ok(client) => client,
            Err(sluice_postgres::Error::Sql(e)) => {
                return Err(sql_error("cannot reconnect to the target database", e))
            }
            Err(other) => {
                tracing::warn!(error = %other, "postgres target: cannot connect");
                return Ok(());
            }
        };
        self.client = Some(client);
        if !self.shards {
            self.applied = self.read_checkpoint().await?;
        }
        Ok(())
    }

    fn client(&self) -> Result<&tokio_postgres::Client, TargetError> {
        self.client.as_ref().ok_or_else(|| TargetError {
            target: TARGET,
            kind: ErrorKind::Transient,
            message: "not connected".into(),
            source: None,
        })
    }

    /// Every operation in one transaction and one round trip.
    async fn apply_all(&self, ops: &[Op], checkpoint: &Checkpoint) -> Result<(), TargetError> {
        let mut sql = String::from("BEGIN;\n");
        let statements = self.statements(ops, &mut sql)?;
        self.sequence_statements(ops, &mut sql);
        self.checkpoint_statement(checkpoint, &mut sql);
        sql.push_str("COMMIT");
        let client = self.client()?;
        let messages = match client.simple_query(&sql).await {
            Ok(messages) => messages,
            Err(error) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(sql_error("cannot apply a batch", error));
            }
        };
        let counts = row_counts(&messages);
        self.stats.applied.fetch_add(ops.len() as u64, Ordering::Relaxed);
        // counts[0] is BEGIN; partial updates of rows the target lacks changed nothing.
        for (index, statement) in statements.iter().enumerate() {
            if let Statement::Update(op) = statement {
                if counts.get(index + 1) == Some(&0) {
                    self.missing_row(&ops[*op]).await?;
                }
            }
        }
        Ok(())
    }

    /// Each operation under its own savepoint, so refused ones are dead-lettered and the rest
    /// commits: the path of a batch holding a row the target refuses.
    async fn apply_each(&self, ops: &[Op], checkpoint: &Checkpoint) -> Result<(), TargetError> {
        let client = self.client()?;
        client.batch_execute("BEGIN").await.map_err(|e| sql_error("cannot begin", e))?;
        let result = async {
            for op in ops {
                let mut sql = String::from("SAVEPOINT sluice_op;\n");
                let statements = self.statements(std::slice::from_ref(op), &mut sql)?;
                sql.push_str("RELEASE SAVEPOINT sluice_op");
                match client.simple_query(&sql).await {
                    Ok(messages) => {
                        self.stats.applied.fetch_add(1, Ordering::Relaxed);
                        let changed = row_counts(&messages).get(1).copied();
                        if matches!(statements.first(), Some(Statement::Update(_))) && changed == Some(0) {
                            self.missing_row(op).await?;
                        }
                    }
                    Err(error) if classify(&error) == ErrorKind::Poison => {
                        client
                            .batch_execute("ROLLBACK TO SAVEPOINT sluice_op; RELEASE SAVEPOINT sluice_op")
                            .await
                            .map_err(|e| sql_error("cannot roll back to a savepoint", e))?;
                        self.dead_letter
                            .record(
                                op.position,
                                &op.source,
                                Some(&|line: &mut Vec<u8>| details(line, &op.op)),
                                &refusal(&error),
                            )
                            .await?;
                    }
                    Err(error) => return Err(sql_error("cannot apply a change", error)),
                }
            }
            let mut sql = String::new();
            self.sequence_statements(ops, &mut sql);
            self.checkpoint_statement(checkpoint, &mut sql);
            sql.push_str("COMMIT");
            client.batch_execute(&sql).await.map_err(|e| sql_error("cannot commit", e))
        }
        .await;
        if result.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        result
    }

    /// A partial update (unchanged TOAST columns) of a row the target does not hold cannot be
    /// completed: the unchanged values are not in the stream. Dead-lettered, so a backfill of
    /// the table can repair it.
    async fn missing_row(&self, op: &Op) -> Result<(), TargetError> {
        let reason =
            "partial update (unchanged TOAST columns) of a row the target does not hold; backfill the table";
        self.dead_letter
            .record(op.position, &op.source, Some(&|line: &mut Vec<u8>| details(line, &op.op)), reason)
            .await?;
        Ok(())
    }

    /// Appends, for each sequence-filled column the operations write, a statement that moves
    /// its sequence to the highest value written when the sequence is behind it (`nextval` then
    /// returns a larger one). It runs in the batch's transaction, but `setval` takes effect at
    /// once; a batch that rolls back leaves at most a gap, never a key handed out twice.
    fn sequence_statements(&self, ops: &[Op], sql: &mut String) {
        if self.sequences.is_empty() {
            return;
        }
        // Sequence (quoted name) → the highest value written to its column.
        let mut highest: BTreeMap<&str, i64> = BTreeMap::new();
        for op in ops {
            let (table, columns) = match &op.op {
                RowOp::Upsert { table, columns } => (table, columns),
                RowOp::Update { table, set, .. } => (table, set),
                RowOp::Delete { .. } | RowOp::Truncate { .. } => continue,
            };
            let Some(sequences) = self.sequences.get(table) else { continue };
            for sequence in sequences {
                let written = columns
                    .iter()
                    .find(|(name, _)| *name == sequence.column)
                    .and_then(|(_, text)| text.as_deref()?.parse::<i64>().ok());
                let Some(value) = written else { continue };
                highest.entry(&sequence.quoted).and_modify(|max| *max = (*max).max(value)).or_insert(value);
            }
        }
        for (sequence, value) in highest {
            let _ = writeln!(
                sql,
                "SELECT setval({literal}, {value}) FROM {sequence} WHERE last_value < {value} OR (last_value = {value} AND NOT is_called);",
                literal = quote_literal(sequence),
            );
        }
    }

    fn checkpoint_statement(&self, checkpoint: &Checkpoint, sql: &mut String) {
        match checkpoint {
            Checkpoint::Position(last) => {
                let _ = writeln!(
                    sql,
                    "INSERT INTO {} (pipeline, commit_lsn, tx_ordinal, updated_at) VALUES ({}, '{}', {}, now()) \
                     ON CONFLICT (pipeline) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, tx_ordinal = EXCLUDED.tx_ordinal, updated_at = EXCLUDED.updated_at;",
                    self.checkpoint_table,
                    quote_literal(&self.pipeline),
                    last.commit_lsn,
                    last.tx_ordinal
                );
            }
            Checkpoint::Partition { name, last } => {
                // Never backwards: an applier that lost the partition may still commit late.
                let _ = writeln!(
                    sql,
                    "INSERT INTO {table} AS c (pipeline, commit_lsn, tx_ordinal, updated_at) VALUES ({}, '{}', {}, now()) \
                     ON CONFLICT (pipeline) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, tx_ordinal = EXCLUDED.tx_ordinal, updated_at = EXCLUDED.updated_at \
                     WHERE (c.commit_lsn, c.tx_ordinal) < (EXCLUDED.commit_lsn, EXCLUDED.tx_ordinal);",
                    quote_literal(name),
                    last.commit_lsn,
                    last.tx_ordinal,
                    table = self.checkpoint_table,
                );
            }
            Checkpoint::Shards(shards) if shards.is_empty() => {}
            Checkpoint::Shards(shards) => {
                let _ = write!(
                    sql,
                    "INSERT INTO {} AS c (pipeline, shard, stream_arn, sequence_number, finished, read_to, updated_at) VALUES ",
                    self.checkpoint_table
                );
                for (n, shard) in shards.iter().enumerate() {
                    let _ = write!(
                        sql,
                        "{}({}, {}, {}, {}, {}, {}, now())",
                        if n == 0 { "" } else { ", " },
                        quote_literal(&self.pipeline),
                        quote_literal(&shard.shard),
                        quote_literal(&shard.stream_arn),
                        shard
                            .sequence
                            .as_deref()
                            .map(|s| format!("CAST({} AS numeric)", quote_literal(s)))
                            .unwrap_or_else(|| "NULL".into()),
                        shard.finished,
                        shard.read_to.map(|t| format!("to_timestamp({t})")).unwrap_or_else(|| "NULL".into()),
                    );
                }
                // Never backwards: a shard's sequence number and read time only grow.
                sql.push_str(
                    " ON CONFLICT (pipeline, shard) DO UPDATE SET \
                     sequence_number = GREATEST(c.sequence_number, EXCLUDED.sequence_number), \
                     finished = c.finished OR EXCLUDED.finished, read_to = GREATEST(c.read_to, EXCLUDED.read_to), \
                     updated_at = now();\n",
                );
            }
        }
    }

    /// Appends the statements for `ops` to `sql`, one per line, grouping consecutive upserts of
    /// one table and column set (never the same key twice in a statement, which ON CONFLICT
    /// refuses) and consecutive deletes of one table.
    fn statements(&self, ops: &[Op], sql: &mut String) -> Result<Vec<Statement>, TargetError> {
        let mut statements = Vec::new();
        let mut index = 0;
        while index < ops.len() {
            let table = self.table(ops[index].op.table())?;
            match &ops[index].op {
                RowOp::Upsert { columns, .. } => {
                    let names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
                    let mut keys = HashSet::new();
                    let mut rows = Vec::new();
                    while let Some(Op { op: RowOp::Upsert { table: t, columns: c }, .. }) = ops.get(index) {
                        if t != ops[rows.first().copied().unwrap_or(index)].op.table()
                            || c.len() != names.len()
                            || c.iter().zip(&names).any(|((a, _), b)| a != b)
                            || rows.len() == ROWS_PER_STATEMENT
                            || !keys.insert(key_values(c, &table.key))
                        {
                            break;
                        }
                        rows.push(index);
                        index += 1;
                    }
                    let _ = write!(
                        sql,
                        "INSERT INTO {} ({}) VALUES ",
                        table.quoted,
                        names.iter().map(|n| quote_ident(n)).collect::<Vec<_>>().join(", ")
                    );
                    for (n, &row) in rows.iter().enumerate() {
                        let RowOp::Upsert { columns, .. } = &ops[row].op else { unreachable!() };
                        sql.push_str(if n == 0 { "(" } else { ", (" });
                        table.values(columns, sql)?;
                        sql.push(')');
                    }
                    let updates: Vec<String> = names
                        .iter()
                        .filter(|n| !table.key.iter().any(|k| k == *n))
                        .map(|n| format!("{0} = EXCLUDED.{0}", quote_ident(n)))
                        .collect();
                    let key = table.key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ");
                    if updates.is_empty() {
                        let _ = writeln!(sql, " ON CONFLICT ({key}) DO NOTHING;");
                    } else {
                        let _ = writeln!(sql, " ON CONFLICT ({key}) DO UPDATE SET {};", updates.join(", "));
                    }
                    statements.push(Statement::Upsert);
                }
                RowOp::Delete { .. } => {
                    let _ = write!(
                        sql,
                        "DELETE FROM {} WHERE ({}) IN (",
                        table.quoted,
                        table.key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
                    );
                    let mut n = 0;
                    while let Some(Op { op: RowOp::Delete { table: t, key }, .. }) = ops.get(index) {
                        if t != ops[index - n].op.table() || n == ROWS_PER_STATEMENT {
                            break;
                        }
                        sql.push_str(if n == 0 { "(" } else { ", (" });
                        table.values(key, sql)?;
                        sql.push(')');
                        n += 1;
                        index += 1;
                    }
                    sql.push_str(");\n");
                    statements.push(Statement::Delete);
                }
                RowOp::Update { key, set, .. } => {
                    if set.is_empty() {
                        // Only the key was present: nothing changes.
                        index += 1;
                        continue;
                    }
                    let _ = write!(sql, "UPDATE {} SET ", table.quoted);
                    for (n, (name, text)) in set.iter().enumerate() {
                        let _ = write!(sql, "{}{} = ", if n == 0 { "" } else { ", " }, quote_ident(name));
                        table.value(name, text, sql)?;
                    }
                    let _ = write!(
                        sql,
                        " WHERE ({}) = (",
                        table.key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
                    );
                    table.values(key, sql)?;
                    sql.push_str(");\n");
                    statements.push(Statement::Update(index));
                    index += 1;
                }
                RowOp::Truncate { .. } => {
                    let _ = writeln!(sql, "TRUNCATE {};", table.quoted);
                    statements.push(Statement::Truncate);
                    index += 1;
                }
            }
        }
        Ok(statements)
    }

    fn table(&self, name: &Arc<str>) -> Result<&TargetTable, TargetError> {
        self.tables
            .get(name)
            .ok_or_else(|| fatal(format!("target table {name} is not in the catalog read at start")))
    }
}

/// The rows each statement of a simple query affected, in statement order.
fn row_counts(messages: &[SimpleQueryMessage]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| if let SimpleQueryMessage::CommandComplete(n) = m { Some(*n) } else { None })
        .collect()
}

/// What a statement was, to read its row count.
enum Statement {
    Upsert,
    Delete,
    /// A partial update of the operation at this index.
    Update(usize),
    Truncate,
}

fn key_values(columns: &[(String, Text)], key: &[String]) -> Vec<Text> {
    key.iter().map(|k| columns.iter().find(|(c, _)| c == k).and_then(|(_, t)| t.clone())).collect()
}

/// The dead-letter entry's fields for an operation: the target table and the operation, not the
/// values.
/// What a dead-letter entry of the Postgres target carries beside the change's position: the
/// target table, the operation, the target row's key (updates and deletes) and the columns
/// written (upserts and updates), with target column names and values as text. `sluice
/// dead-letter replay` leads the key back to the source row through the mapping's renames.
fn details(line: &mut Vec<u8>, op: &RowOp) {
    line.extend_from_slice(b",\"target_table\":");
    crate::json::string(line, op.table());
    let (kind, key, row) = match op {
        RowOp::Upsert { columns, .. } => ("upsert", None, Some(columns)),
        RowOp::Update { key, set, .. } => ("update", Some(key), Some(set)),
        RowOp::Delete { key, .. } => ("delete", Some(key), None),
        RowOp::Truncate { .. } => ("truncate", None, None),
    };
    line.extend_from_slice(format!(",\"operation\":\"{kind}\"").as_bytes());
    for (name, columns) in [("key", key), ("row", row)] {
        let Some(columns) = columns else { continue };
        line.extend_from_slice(format!(",\"{name}\":{{").as_bytes());
        for (i, (column, value)) in columns.iter().enumerate() {
            if i > 0 {
                line.push(b',');
            }
            crate::json::string(line, column);
            line.push(b':');
            match value {
                Some(text) => crate::json::string(line, text),
                None => line.extend_from_slice(b"null"),
            }
        }
        line.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_details_carry_the_key_and_the_row_as_json() {
        let mut line = br#"{"table":"public.customers""#.to_vec();
        let op = RowOp::Update {
            table: "v2.clients".into(),
            key: vec![("client_id".into(), Some("7".into()))],
            set: vec![("note".into(), Some("say \"hi\"".into())), ("gone".into(), None)],
        };
        details(&mut line, &op);
        line.push(b'}');
        let json: serde_json::Value = serde_json::from_slice(&line[..]).unwrap();
        assert_eq!(json["target_table"], "v2.clients");
        assert_eq!(json["operation"], "update");
        assert_eq!(json["key"]["client_id"], "7");
        assert_eq!(json["row"]["note"], "say \"hi\"");
        assert!(json["row"]["gone"].is_null());
    }

    #[test]
    fn a_checkpoint_row_out_of_range_is_an_error_not_position_zero() {
        assert_eq!(
            checkpoint_position("0/16B3748", 3),
            Ok(Position { commit_lsn: "0/16B3748".parse().unwrap(), tx_ordinal: 3 })
        );
        assert!(checkpoint_position("0/16B3748", -1).unwrap_err().contains("tx_ordinal -1"));
        assert!(checkpoint_position("0/16B3748", 1 << 40).is_err());
        assert!(checkpoint_position("garbage", 0).unwrap_err().contains("commit_lsn"));
    }
}
