//! Targets: where change events are made durable. One folder per target, each with the same
//! split: `config.rs` (its configuration and the checks that need no server), `mapping.rs`
//! (where it has a mapping format), `translate.rs` (pure: change events to the target's
//! operations), `apply.rs` (the [`Target`] that makes them durable), `verify.rs` (its side of
//! `sluice verify`, where it has one) and `check.rs` (its live checks for `sluice validate`).
//! A new target is a new folder here and a variant of [`TargetConfig`] and [`AnyTarget`].

pub(crate) mod dead_letter;
pub mod dynamodb;
pub mod jsonl;
pub mod kafka;
pub(crate) mod null;
pub mod postgres;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use sluice_core::Problem;

pub use dead_letter::DeadLetter;
use dynamodb::apply::DynamoTarget;
use dynamodb::config::DynamoConfig;
use dynamodb::translate::DynamoTranslator;
use jsonl::apply::JsonlTarget;
use jsonl::config::JsonlConfig;
use jsonl::translate::JsonlTranslator;
use kafka::apply::KafkaTarget;
use kafka::config::KafkaConfig;
use kafka::translate::KafkaTranslator;
pub use null::{NullTarget, NullTranslator};
use postgres::apply::PgTarget;
use postgres::config::PostgresTargetConfig;
use postgres::translate::PgTranslator;
use sluice_core::{Lsn, Position};

use crate::error::TargetError;

/// Where changes go.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TargetConfig {
    /// Items in DynamoDB tables, through a mapping, with position-guarded writes.
    Dynamodb(DynamoConfig),
    /// Records in Kafka topics: plain CDC per table, and the outbox event router.
    Kafka(KafkaConfig),
    /// Rows in tables of another Postgres database or schema, through a mapping, applied in
    /// source order with a transactional checkpoint.
    Postgres(PostgresTargetConfig),
    /// One JSON object per change, to a file or standard output.
    Jsonl(JsonlConfig),
    /// Discards everything at once (benchmarks).
    Null,
}

impl TargetConfig {
    /// When the target writes without a per-write condition (DynamoDB's `batch` mode): the
    /// longest one of its requests may take, which a predecessor's last write can still land
    /// within after it stopped. `None` when every write carries its own guard.
    pub fn unconditional_writes(&self) -> Option<std::time::Duration> {
        match self {
            TargetConfig::Dynamodb(dynamo) if dynamo.write_mode == dynamodb::config::WriteMode::Batch => {
                Some(dynamo.request_timeout)
            }
            _ => None,
        }
    }

    /// The outbox event router, when the target has one.
    pub fn outbox(&self) -> Option<&crate::translate::outbox::OutboxConfig> {
        match self {
            TargetConfig::Kafka(kafka) => kafka.outbox.as_ref(),
            TargetConfig::Dynamodb(dynamo) => dynamo.outbox.as_ref(),
            TargetConfig::Jsonl(_) | TargetConfig::Postgres(_) | TargetConfig::Null => None,
        }
    }
}

impl TargetConfig {
    /// Every problem of the target's configuration visible without the target, named by its
    /// dotted key; `messages`: the source decodes logical messages.
    pub fn validate(&self, messages: bool, problems: &mut Vec<Problem>) {
        match self {
            TargetConfig::Dynamodb(c) => c.validate(messages, problems),
            TargetConfig::Kafka(c) => c.validate(messages, problems),
            TargetConfig::Postgres(c) => c.validate(problems),
            TargetConfig::Jsonl(c) => c.validate(problems),
            TargetConfig::Null => {}
        }
    }
}

/// Counters every target keeps, for metrics and `sluice status`.
#[derive(Debug, Default)]
pub struct TargetStats {
    /// Writes applied.
    pub applied: std::sync::atomic::AtomicU64,
    /// Writes the position guard found already applied (replays, superseded writes).
    pub already_applied: std::sync::atomic::AtomicU64,
    /// Requests retried after throttling, 5xx or network errors.
    pub retries: std::sync::atomic::AtomicU64,
    /// Changes sent to the dead-letter store.
    pub dead_lettered: std::sync::atomic::AtomicU64,
}

/// Resolves when a submitted batch is durable (or failed).
pub type Receipt = Pin<Box<dyn Future<Output = Result<(), TargetError>> + Send>>;

/// An operation with the change it came from: its position (the guard, the checkpoint, the
/// dead-letter entry) and its source (the table, or `message:<prefix>`, named only when the
/// operation is dead-lettered).
#[derive(Debug)]
pub struct Sourced<Op> {
    /// The operation.
    pub op: Op,
    /// The position of the change it came from.
    pub position: Position,
    /// The change's table, or `message:<prefix>`.
    pub source: Arc<str>,
}

/// The operations of one batch of changes, in source order.
#[derive(Debug)]
pub struct OpBatch<Op> {
    /// The operations, in source order.
    pub ops: Vec<Sourced<Op>>,
    /// Changes the batch held (translated or not).
    pub events: usize,
    /// Changes at or before this commit LSN may have been delivered before (see
    /// [`sluice_core::EventBatch::redelivery_horizon`]).
    pub redelivery_horizon: Option<Lsn>,
    /// The partition the changes were read from (the Kafka source): positions are in order
    /// within it only (see [`sluice_core::EventBatch::slice`]).
    pub slice: Option<sluice_core::LogSlice>,
}

/// A destination for change events. The pipeline translates each batch with the target's
/// [`Translator`] (dead-lettering the changes that cannot be translated), then submits the
/// operations; a target only applies them.
///
/// Contract:
/// - `submit` is called with batches in source commit order, one call at a time. It may wait
///   for capacity (backpressure) and returns a receipt.
/// - The receipt resolves `Ok` only once every operation of the batch is durable (applied,
///   found already applied, or dead-lettered): it would survive a crash of sluice (and of the
///   target's process, as far as the target can promise).
/// - Receipts may resolve in any order; the pipeline confirms source positions only over an
///   unbroken run of durable batches, so a target may apply independent keys concurrently, but
///   must keep the order of changes to the same key.
/// - Delivery is at least once: after a restart the source replays from the last confirmed
///   position, so a target sees some changes again and must absorb them (position guards, or
///   duplicates documented as such). A target that knows exactly what it applied says so in
///   [`Target::applied_through`], and those changes are skipped before translation.
pub trait Target: Send {
    /// What the target applies: its translator's operation.
    type Op: Send + 'static;

    /// Submits one batch's operations.
    fn submit(
        &mut self,
        batch: OpBatch<Self::Op>,
    ) -> impl Future<Output = Result<Receipt, TargetError>> + Send;

    /// The position through which every change is known to be applied (a transactional
    /// checkpoint), when the target keeps one.
    fn applied_through(&self) -> Option<Position> {
        None
    }
}

/// A target opened from its configuration, with the translator that feeds it.
pub(crate) enum Opened {
    Dynamodb(DynamoTranslator, DynamoTarget),
    Kafka(KafkaTranslator, KafkaTarget),
    Postgres(PgTranslator, PgTarget),
    Jsonl(JsonlTranslator, JsonlTarget),
    Null(NullTranslator, NullTarget),
}

impl Opened {
    /// The target `config` describes, for the pipeline named `pipeline`; it counts into `stats`
    /// and dead-letters into `dead_letter`. A database target's sessions carry the replication
    /// origin `origin` (the forward direction's).
    pub(crate) async fn open(
        config: &TargetConfig,
        pipeline: &str,
        origin: &str,
        stats: Arc<TargetStats>,
        dead_letter: Arc<DeadLetter>,
    ) -> Result<Self, TargetError> {
        Ok(match config {
            TargetConfig::Dynamodb(c) => {
                Opened::Dynamodb(DynamoTranslator::open(c)?, DynamoTarget::open(c, stats, dead_letter).await?)
            }
            TargetConfig::Kafka(c) => {
                Opened::Kafka(KafkaTranslator::open(c), KafkaTarget::open(c, stats, dead_letter)?)
            }
            TargetConfig::Postgres(c) => {
                let (translator, target) = PgTarget::open(c, pipeline, origin, stats, dead_letter).await?;
                Opened::Postgres(translator, target)
            }
            TargetConfig::Jsonl(c) => Opened::Jsonl(JsonlTranslator::new(c), JsonlTarget::open(c).await?),
            TargetConfig::Null => Opened::Null(NullTranslator, NullTarget::default()),
        })
    }
}

impl TargetConfig {
    /// The target's name in metrics, logs and dead-letter entries.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetConfig::Dynamodb(_) => "dynamodb",
            TargetConfig::Kafka(_) => "kafka",
            TargetConfig::Postgres(_) => "postgres",
            TargetConfig::Jsonl(_) => "jsonl",
            TargetConfig::Null => "null",
        }
    }

    /// The dead-letter file, when the target has one configured.
    pub fn dead_letter(&self) -> Option<&std::path::Path> {
        match self {
            TargetConfig::Dynamodb(c) => c.dead_letter.as_deref(),
            TargetConfig::Kafka(c) => c.dead_letter.as_deref(),
            TargetConfig::Postgres(c) => c.dead_letter.as_deref(),
            TargetConfig::Jsonl(_) | TargetConfig::Null => None,
        }
    }
}
