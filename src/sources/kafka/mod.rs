//! The Kafka source: an applier in a consumer group reads sluice's CDC records (a Kafka
//! target's topics) and hands them to the pipeline as the change events they were made from,
//! so that a DynamoDB or Postgres target applies them with its usual guards. Throughput then
//! grows with the topics' partitions and the group's members.
//!
//! ```text
//! KafkaConsumer (thread) ──Fetched (one partition)──▶ decode ──EventBatch{slice}──▶ pipeline
//!        ▲ commit durable offsets                                                      │
//!        └──── per-partition offsets ◀── batch tokens ◀────────── durable (watch) ◀────┘
//! ```
//!
//! - **Acknowledgement tokens.** Each batch's `ack_lsn` is a token (1, 2, 3, …), not an LSN:
//!   the pipeline publishes the highest token over an unbroken prefix of durable batches, and
//!   this source turns it back into each partition's offset, which the consumer commits.
//!   A partition's offset is so committed only once every record before it is durable.
//! - **Order.** A key lives in one partition, read in offset order, and each batch holds one
//!   partition's records: per-key order holds. Across partitions there is no order, so the
//!   pipeline skips nothing by a global position (`redelivery_horizon` is `None`: any record
//!   may be a repeat) and the Postgres target keeps a checkpoint per partition.
//! - **Repeats.** After a crash or a rebalance a partition is read again from its last
//!   commit, and the forward pipeline may have written a change twice (at least once): the
//!   DynamoDB version guard and the Postgres target's per-partition checkpoint absorb both.
//! - **What is not a change.** Tombstones are skipped (the delete before them is the change).
//!   A record that is not sluice's format, and a TRUNCATE (a partition cannot order it against
//!   the other partitions' changes), go to the dead-letter store, counted; their offsets are
//!   committed with the batch after them, since the entry is durable.

pub mod config;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use sluice_core::{ChangeEvent, EventBatch, LogSlice, Lsn, Position, Shutdown};
use sluice_kafka::consumer::{ConsumerError, Fetched, KafkaConsumer, TopicPartition};
use sluice_postgres::SourceStats;
use tokio::sync::{mpsc, watch};

use crate::error::PipelineError;
use crate::targets::kafka::inverse::{Decoded, RecordReader};
use crate::targets::DeadLetter;
pub use config::KafkaSourceConfig;

/// Batches decoded ahead of the pipeline (each up to `pipeline.batch_max_events` records).
const FETCHED_BATCHES: usize = 2;

/// A consumer group member feeding one pipeline.
pub struct KafkaSource {
    config: KafkaSourceConfig,
    batch_max_events: usize,
    shutdown_timeout: Duration,
    /// The target's request timeout when its writes are unguarded (fencing).
    fencing: Option<Duration>,
    dead_letter: Arc<DeadLetter>,
    stats: Arc<SourceStats>,
}

impl KafkaSource {
    /// The source `config` describes; `dead_letter` takes the records that are no change;
    /// `fencing`: the target's request timeout when its writes are unguarded.
    pub fn new(
        config: KafkaSourceConfig,
        batch_max_events: usize,
        shutdown_timeout: Duration,
        fencing: Option<Duration>,
        dead_letter: Arc<DeadLetter>,
    ) -> Self {
        KafkaSource {
            config,
            batch_max_events,
            shutdown_timeout,
            fencing,
            dead_letter,
            stats: Arc::default(),
        }
    }

    /// The source's counters (events, bytes, streaming).
    pub fn stats(&self) -> Arc<SourceStats> {
        Arc::clone(&self.stats)
    }

    /// Reads until `shutdown` (then waits up to `pipeline.shutdown_timeout` for what was handed
    /// out to become durable, and commits it), until the pipeline closes `batches`, or until the
    /// consumer fails.
    pub async fn run(
        self,
        batches: mpsc::Sender<EventBatch>,
        durable: watch::Receiver<Lsn>,
        mut shutdown: Shutdown,
    ) -> Result<(), PipelineError> {
        let options = self.config.consumer_options(self.batch_max_events, self.fencing);
        let (fetched_tx, mut fetched) = mpsc::channel(FETCHED_BATCHES);
        let topics = self.config.topics.join(", ");
        let consumer = tokio::task::spawn_blocking(move || KafkaConsumer::start(&options, fetched_tx))
            .await
            .map_err(|e| PipelineError::Task(e.to_string()))?
            .map_err(|source| consumer_error(source, &topics))?;
        let consumer = Arc::new(consumer);
        self.stats.streaming.store(true, Ordering::Relaxed);
        tracing::info!(group = %self.config.group_id, topics = %topics, "kafka source: joined the consumer group");
        // Batch tokens handed out and not yet durable, with where each ends.
        let handed_out: Arc<Mutex<VecDeque<(u64, LogSlice)>>> = Arc::default();
        let forward =
            tokio::spawn(forward_durable(Arc::clone(&consumer), Arc::clone(&handed_out), durable.clone()));
        let metrics = tokio::spawn(publish_metrics(Arc::clone(&consumer)));
        let mut reader = RecordReader::default();
        let mut token = 0u64;
        let outcome = loop {
            let next = tokio::select! {
                _ = shutdown.requested() => break Ok(()),
                next = fetched.recv() => next,
            };
            let Some(next) = next else {
                // The consumer thread ended: its error, if any.
                break consumer.join().await.map_err(|source| consumer_error(source, &topics));
            };
            let (token, slice, batch) = match self.decode(next, &mut reader, &mut token).await {
                Ok(decoded) => decoded,
                Err(error) => break Err(error),
            };
            handed_out.lock().unwrap_or_else(|e| e.into_inner()).push_back((token, slice));
            if batches.send(batch).await.is_err() {
                // The pipeline stopped (a failed target): nothing more is confirmed.
                break Ok(());
            }
        };
        drop(batches);
        if outcome.is_ok() && shutdown.is_requested() {
            // Drain: what was handed out becomes durable (or the timeout passes), then the
            // consumer's last commit covers it.
            let last = handed_out.lock().unwrap_or_else(|e| e.into_inner()).back().map(|(t, _)| *t);
            if let Some(last) = last {
                let mut durable = durable.clone();
                let _ =
                    tokio::time::timeout(self.shutdown_timeout, durable.wait_for(|lsn| lsn.0 >= last)).await;
                tokio::task::yield_now().await;
            }
        }
        forward.abort();
        metrics.abort();
        self.stats.streaming.store(false, Ordering::Relaxed);
        let stopped = consumer.stop().await.map_err(|source| consumer_error(source, &topics));
        outcome.and(stopped)
    }

    /// One partition's records as a batch of change events, with its acknowledgement token. A
    /// batch of no change (tombstones, dead-lettered records) still goes through the pipeline,
    /// so that its offsets are committed in order with the others'.
    async fn decode(
        &self,
        fetched: Fetched,
        reader: &mut RecordReader,
        token: &mut u64,
    ) -> Result<(u64, LogSlice, EventBatch), PipelineError> {
        let Fetched { partition, generation, records, next_offset } = fetched;
        let mut events = Vec::with_capacity(records.len());
        let mut commit_time = None;
        let (mut tombstones, mut rejected) = (0u64, 0u64);
        for record in &records {
            let bytes = record.payload.as_ref().map_or(0, Vec::len);
            self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            let reason = match reader.read(&record.headers, record.payload.as_deref()) {
                Ok(Decoded::Tombstone) => {
                    tombstones += 1;
                    continue;
                }
                Ok(Decoded::Change(ChangeEvent::Truncate { relations, position, .. }, _)) => {
                    let tables = relations.iter().map(|r| r.qualified_name()).collect::<Vec<_>>().join(",");
                    self.reject(&partition, record, position, &tables,
                        "a TRUNCATE read from one partition cannot be ordered against the changes in the topic's other partitions; \
                         it is not applied: truncate the target table and backfill it").await?;
                    rejected += 1;
                    continue;
                }
                Ok(Decoded::Change(event, time)) => {
                    commit_time = time.or(commit_time);
                    events.push(event);
                    continue;
                }
                Err(reason) => reason,
            };
            self.reject(
                &partition,
                record,
                Position::default(),
                "",
                &format!("not a sluice CDC record: {reason}"),
            )
            .await?;
            rejected += 1;
        }
        let changes = events.len() as u64;
        self.stats.events.fetch_add(changes, Ordering::Relaxed);
        for (outcome, n) in [("change", changes), ("tombstone", tombstones), ("dead_lettered", rejected)] {
            if n > 0 {
                metrics::counter!(crate::metrics::KAFKA_RECORDS_TOTAL, "outcome" => outcome).increment(n);
            }
        }
        *token += 1;
        let slice = LogSlice {
            topic: Arc::clone(&partition.topic),
            partition: partition.partition,
            generation,
            next_offset,
        };
        let batch = EventBatch {
            events,
            ack_lsn: Some(Lsn(*token)),
            redelivery_horizon: None,
            commit_time,
            slice: Some(slice.clone()),
        };
        Ok((*token, slice, batch))
    }

    /// Dead-letters a record that is no change the target can apply: where it is, its key and
    /// value (base64), and why.
    async fn reject(
        &self,
        partition: &TopicPartition,
        record: &sluice_kafka::consumer::Consumed,
        position: Position,
        tables: &str,
        reason: &str,
    ) -> Result<(), PipelineError> {
        let encode = |bytes: &Option<Vec<u8>>| {
            bytes.as_ref().map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        };
        let (key, value) = (encode(&record.key), encode(&record.payload));
        let details = |line: &mut Vec<u8>| {
            line.extend_from_slice(b",\"topic\":");
            crate::json::string(line, &partition.topic);
            line.extend_from_slice(
                format!(",\"partition\":{},\"offset\":{}", partition.partition, record.offset).as_bytes(),
            );
            for (name, bytes) in [("key_base64", &key), ("value_base64", &value)] {
                line.extend_from_slice(format!(",\"{name}\":").as_bytes());
                match bytes {
                    Some(text) => crate::json::string(line, text),
                    None => line.extend_from_slice(b"null"),
                }
            }
        };
        let source = if tables.is_empty() {
            format!("kafka:{partition}@{}", record.offset)
        } else {
            tables.to_owned()
        };
        self.dead_letter.record(position, &source, Some(&details), reason).await?;
        Ok(())
    }
}

/// The error that stops the source, naming the setting at fault.
fn consumer_error(source: ConsumerError, topics: &str) -> PipelineError {
    let message = match &source {
        ConsumerError::UnknownTopic { topic } => format!(
            "Kafka topic {topic:?} does not exist (source.kafka.topics = [{topics}]); create it, or point the applier at the topics the Kafka target writes"
        ),
        ConsumerError::Config(_) => "the Kafka consumer's configuration is refused (source.kafka.properties)".into(),
        ConsumerError::Subscribe(_) => format!("cannot subscribe to the Kafka topics (source.kafka.topics = [{topics}], source.kafka.brokers)"),
        ConsumerError::Consume(_) => "the Kafka consumer failed (source.kafka: group_id, properties)".into(),
        ConsumerError::Panicked => "the Kafka consumer thread panicked".into(),
    };
    PipelineError::Consumer { message, source }
}

/// Turns the pipeline's durable token into each partition's durable offset.
async fn forward_durable(
    consumer: Arc<KafkaConsumer>,
    handed_out: Arc<Mutex<VecDeque<(u64, LogSlice)>>>,
    mut durable: watch::Receiver<Lsn>,
) {
    while durable.changed().await.is_ok() {
        let through = durable.borrow_and_update().0;
        let done: Vec<LogSlice> = {
            let mut handed_out = handed_out.lock().unwrap_or_else(|e| e.into_inner());
            let mut done = Vec::new();
            while handed_out.front().is_some_and(|(token, _)| *token <= through) {
                if let Some((_, slice)) = handed_out.pop_front() {
                    done.push(slice);
                }
            }
            done
        };
        for slice in done {
            let tp = TopicPartition { topic: slice.topic, partition: slice.partition };
            consumer.durable(&tp, slice.generation, slice.next_offset);
        }
    }
}

/// Every few seconds: per-partition lag, partitions owned, commits and rebalances.
async fn publish_metrics(consumer: Arc<KafkaConsumer>) {
    let stats = consumer.stats();
    let mut published: Vec<TopicPartition> = Vec::new();
    let (mut commits, mut failures, mut rebalances) = (0, 0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let partitions = consumer.partitions();
        metrics::gauge!(crate::metrics::KAFKA_PARTITIONS_ASSIGNED).set(partitions.len() as f64);
        for gone in published.iter().filter(|tp| !partitions.iter().any(|p| p.partition == **tp)) {
            // Another member owns it now and reports its lag.
            metrics::gauge!(crate::metrics::KAFKA_CONSUMER_LAG, "topic" => gone.topic.to_string(), "partition" => gone.partition.to_string()).set(0.0);
        }
        published = partitions.iter().map(|p| p.partition.clone()).collect();
        for p in &partitions {
            let Some(high) = p.high_watermark else { continue };
            let Some(through) = p.durable.or(p.read_from) else { continue };
            metrics::gauge!(crate::metrics::KAFKA_CONSUMER_LAG, "topic" => p.partition.topic.to_string(), "partition" => p.partition.partition.to_string())
                .set((high - through).max(0) as f64);
        }
        let now = (
            stats.commits.load(Ordering::Relaxed),
            stats.commit_failures.load(Ordering::Relaxed),
            stats.rebalances.load(Ordering::Relaxed),
        );
        metrics::counter!(crate::metrics::KAFKA_COMMITS_TOTAL, "outcome" => "ok").increment(now.0 - commits);
        metrics::counter!(crate::metrics::KAFKA_COMMITS_TOTAL, "outcome" => "failed")
            .increment(now.1 - failures);
        metrics::counter!(crate::metrics::KAFKA_REBALANCES_TOTAL).increment(now.2 - rebalances);
        (commits, failures, rebalances) = now;
    }
}
