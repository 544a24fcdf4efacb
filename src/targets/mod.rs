//! Targets: where change events are made durable. One folder per target, each with the same
//! split: `config.rs` (its configuration and the checks that need no server), `mapping.rs`
//! (where it has a mapping format), `translate.rs` (pure: change events to the target's
//! operations), `apply.rs` (the [`Target`] that makes them durable), `verify.rs` (its side of
//! `sluice verify`, where it has one) and `check.rs` (its live checks for `sluice validate`).
//! A new target is a new folder here and a variant of [`TargetConfig`] and [`AnyTarget`].

pub mod dead_letter;
pub mod dynamodb;
pub mod jsonl;
pub mod kafka;
pub mod null;
pub mod postgres;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use sluice_core::Problem;

pub use dynamodb::apply::DynamoTarget;
use dynamodb::config::DynamoConfig;
pub use jsonl::apply::JsonlTarget;
use jsonl::config::JsonlConfig;
pub use kafka::apply::KafkaTarget;
use kafka::config::KafkaConfig;
pub use null::NullTarget;
pub use postgres::apply::PgTarget;
use postgres::config::PostgresTargetConfig;

use crate::error::TargetError;
use sluice_core::EventBatch;

/// Where changes go.
#[derive(Clone, Debug, Deserialize)]
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

/// A destination for change events.
///
/// Contract:
/// - `submit` is called with batches in source commit order, one call at a time. It may wait
///   for capacity (backpressure) and returns a receipt.
/// - The receipt resolves `Ok` only once every event of the batch is durable: it would survive
///   a crash of sluice (and of the target's process, as far as the target can promise).
/// - Receipts may resolve in any order; the pipeline confirms source positions only over an
///   unbroken run of durable batches, so a target may apply independent keys concurrently, but
///   must keep the order of changes to the same key.
/// - Delivery is at least once: after a restart the source replays from the last confirmed
///   position, so a target sees some changes again and must absorb them (position guards, or
///   duplicates documented as such).
pub trait Target: Send {
    fn submit(&mut self, batch: Arc<EventBatch>)
        -> impl Future<Output = Result<Receipt, TargetError>> + Send;
}

/// The targets known at build time.
pub enum AnyTarget {
    Dynamodb(DynamoTarget),
    Kafka(KafkaTarget),
    Postgres(PgTarget),
    Jsonl(JsonlTarget),
    Null(NullTarget),
}

impl AnyTarget {
    /// The target `config` describes, for the pipeline named `pipeline`; it counts into `stats`.
    pub async fn open(
        config: &TargetConfig,
        pipeline: &str,
        stats: Arc<TargetStats>,
    ) -> Result<Self, TargetError> {
        Ok(match config {
            TargetConfig::Dynamodb(c) => AnyTarget::Dynamodb(DynamoTarget::open(c, stats).await?),
            TargetConfig::Kafka(c) => AnyTarget::Kafka(KafkaTarget::open(c, stats).await?),
            TargetConfig::Postgres(c) => AnyTarget::Postgres(PgTarget::open(c, pipeline, stats).await?),
            TargetConfig::Jsonl(c) => AnyTarget::Jsonl(JsonlTarget::open(c).await?),
            TargetConfig::Null => AnyTarget::Null(NullTarget::default()),
        })
    }
}

impl Target for AnyTarget {
    async fn submit(&mut self, batch: Arc<EventBatch>) -> Result<Receipt, TargetError> {
        match self {
            AnyTarget::Dynamodb(t) => t.submit(batch).await,
            AnyTarget::Kafka(t) => t.submit(batch).await,
            AnyTarget::Postgres(t) => t.submit(batch).await,
            AnyTarget::Jsonl(t) => t.submit(batch).await,
            AnyTarget::Null(t) => t.submit(batch).await,
        }
    }
}
