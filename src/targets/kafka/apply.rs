//! The Kafka target: translates each batch into records (`translate::kafka`: plain CDC and the
//! outbox event router) and produces them through one idempotent producer, in batch order.
//!
//! A batch is durable when the broker has acknowledged every record of it (`acks=all`). Records
//! with the same key land in the same partition in the order they were produced, and the
//! idempotent producer keeps that order across its internal retries. While the broker is down
//! the producer retries for `retry_for`; the receipt stays pending meanwhile, so nothing is
//! confirmed and the stream waits (bounded by `max_in_flight` batches). A record that can never
//! be produced (too large, an invalid topic) goes to the dead-letter store; any other failure
//! stops the pipeline.
//!
//! Delivery is at least once: after a crash, changes after the confirmed position are produced
//! again. Consumers deduplicate by the `sluice.position` header (CDC) or the `id` header
//! (outbox events).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use sluice_kafka::{KafkaProducer, ProducerOptions, Record};

use crate::error::{action, Action, Classify, ErrorKind, TargetError};
use crate::targets::dead_letter::DeadLetter;
use crate::targets::kafka::config::KafkaConfig;
use sluice_postgres::error::Chain;

use crate::targets::{OpBatch, Receipt, Sourced, Target, TargetStats};

pub struct KafkaTarget {
    producer: KafkaProducer,
    dead_letter: Arc<DeadLetter>,
    stats: Arc<TargetStats>,
    /// Topics the broker is known to have.
    known_topics: std::collections::HashSet<String>,
    /// With `target.outbox.missing_topic = "dead_letter"`: the outbox's sources (its table, and
    /// `message:<prefix>`), whose events to a missing topic are dead-lettered.
    dead_letter_missing: Vec<String>,
    /// Topics found missing, and when: asked again after `MISSING_RECHECK`.
    missing_topics: std::collections::HashMap<String, Instant>,
}

/// How long a topic found missing is taken as missing before the broker is asked again.
const MISSING_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

impl KafkaTarget {
    pub fn open(
        config: &KafkaConfig,
        stats: Arc<TargetStats>,
        dead_letter: Arc<DeadLetter>,
    ) -> Result<Self, TargetError> {
        let options = ProducerOptions {
            brokers: config.brokers.clone(),
            compression: config.compression,
            message_timeout: config.retry_for,
            client_id: "sluice".into(),
            extra: config.properties.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let producer = KafkaProducer::new(&options).map_err(|e| {
            TargetError::fatal("kafka", "cannot create the Kafka producer (target.properties)", e)
        })?;
        let dead_letter_missing = match &config.outbox {
            Some(outbox) if outbox.missing_topic == crate::translate::outbox::MissingTopic::DeadLetter => {
                outbox
                    .table
                    .iter()
                    .map(|t| t.to_string())
                    .chain(outbox.message_prefix.iter().map(|p| format!("message:{p}")))
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(KafkaTarget {
            producer,
            dead_letter,
            stats,
            known_topics: Default::default(),
            dead_letter_missing,
            missing_topics: Default::default(),
        })
    }
}

/// The dead-letter entry's fields for a record: topic and key (not the value).
fn record_details(topic: String, key: Option<Vec<u8>>) -> impl Fn(&mut Vec<u8>) + Sync {
    move |line: &mut Vec<u8>| {
        line.extend_from_slice(b",\"topic\":");
        crate::json::string(line, &topic);
        line.extend_from_slice(b",\"key\":");
        match &key {
            Some(key) => crate::json::string(line, &String::from_utf8_lossy(key)),
            None => line.extend_from_slice(b"null"),
        }
    }
}

impl Target for KafkaTarget {
    type Op = Record;

    async fn submit(&mut self, batch: OpBatch<Record>) -> Result<Receipt, TargetError> {
        // Per record: its position and source (named only if the record fails), topic and key
        // (for a dead-letter entry), when it was enqueued, and its delivery.
        let mut deliveries = Vec::with_capacity(batch.ops.len());
        for Sourced { op: record, position, source } in batch.ops {
            // A missing topic would only fail after retry_for: say so now.
            if !self.known_topics.contains(&record.topic) {
                let missing_since =
                    self.missing_topics.get(&record.topic).filter(|at| at.elapsed() < MISSING_RECHECK);
                let exists = match missing_since {
                    Some(_) => Ok(false),
                    None => self.producer.topic_exists(&record.topic).await,
                };
                match exists {
                    Ok(true) => {
                        self.missing_topics.remove(&record.topic);
                        self.known_topics.insert(record.topic.clone());
                    }
                    Ok(false) if self.dead_letter_missing.iter().any(|s| **s == *source) => {
                        self.missing_topics.entry(record.topic.clone()).or_insert_with(Instant::now);
                        let reason = format!(
                            "Kafka topic {:?} does not exist (target.outbox.missing_topic = \"dead_letter\"); the event is in this entry",
                            record.topic
                        );
                        // The whole event (headers, payload): it exists nowhere else once the
                        // outbox row is cleaned up.
                        let event = |line: &mut Vec<u8>| {
                            record_details(record.topic.clone(), record.key.clone())(line);
                            line.extend_from_slice(b",\"headers\":{");
                            for (i, (name, value)) in record.headers.iter().enumerate() {
                                if i > 0 {
                                    line.push(b',');
                                }
                                crate::json::string(line, name);
                                line.push(b':');
                                crate::json::string(line, &String::from_utf8_lossy(value));
                            }
                            line.extend_from_slice(b"},\"payload\":");
                            match &record.payload {
                                Some(payload) => crate::json::string(line, &String::from_utf8_lossy(payload)),
                                None => line.extend_from_slice(b"null"),
                            }
                        };
                        self.dead_letter.record(position, &source, Some(&event), &reason).await?;
                        continue;
                    }
                    Ok(false) => {
                        return Err(TargetError {
                            target: "kafka",
                            kind: ErrorKind::Fatal,
                            message: format!(
                                "Kafka topic {:?} (for {source}) does not exist; create it, or change target.topic, target.topics or target.outbox.topic \
                                 (or set target.outbox.missing_topic = \"dead_letter\" for outbox events)",
                                record.topic,
                            ),
                            source: None,
                        });
                    }
                    // The broker is unreachable: the producer's retries decide, and the
                    // topic is not checked again (each check may wait 10 s).
                    Err(error) => {
                        tracing::warn!(topic = %record.topic, error = %error, "cannot check that the Kafka topic exists");
                        self.known_topics.insert(record.topic.clone());
                    }
                }
            }
            match self.producer.enqueue(&record).await {
                Ok(delivery) => {
                    deliveries.push((source, position, record.topic, record.key, Instant::now(), delivery))
                }
                Err(error) if action(error.kind()) == Action::DeadLetter => {
                    let details = record_details(record.topic, record.key);
                    let reason = Chain(&error).to_string();
                    self.dead_letter.record(position, &source, Some(&details), &reason).await?;
                }
                Err(error) => return Err(TargetError::fatal("kafka", "cannot produce to Kafka", error)),
            }
        }
        let (dead_letter, stats) = (Arc::clone(&self.dead_letter), Arc::clone(&self.stats));
        let latency = metrics::histogram!(crate::metrics::TARGET_WRITE_SECONDS, "target" => "kafka");
        Ok(Box::pin(async move {
            for (source, position, topic, key, enqueued, delivery) in deliveries {
                let delivered: Result<(), sluice_kafka::Error> = delivery.await;
                latency.record(enqueued.elapsed().as_secs_f64());
                match delivered {
                    Ok(()) => {
                        stats.applied.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) if action(error.kind()) == Action::DeadLetter => {
                        let details = record_details(topic, key);
                        let reason = Chain(&error).to_string();
                        dead_letter.record(position, &source, Some(&details), &reason).await?;
                    }
                    Err(error) => {
                        return Err(TargetError::fatal("kafka", "a record was not confirmed", error));
                    }
                }
            }
            Ok(())
        }))
    }
}
