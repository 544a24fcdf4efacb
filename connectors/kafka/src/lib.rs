//! Kafka connector for sluice: an idempotent producer whose delivery reports tell the pipeline
//! when a record is durable, plus topic administration for set-up and tests.
//!
//! Ordering and durability: the producer runs with `enable.idempotence=true` and `acks=all`, so
//! the broker writes each record once per partition, in the order it was enqueued, and reports
//! delivery only after every in-sync replica has it. Records with the same key go to the same
//! partition (librdkafka's default partitioner hashes the key), which keeps per-key order.
//! While the broker is unreachable librdkafka keeps retrying for `message_timeout`; only then
//! does a delivery fail, and a failed delivery is never reported as durable.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod consumer;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_core::{Classify, ErrorKind};

/// How to reach the brokers and how to produce. `Debug` hides the values of `extra`
/// properties that hold secrets (passwords, keys, tokens).
#[derive(Clone)]
pub struct ProducerOptions {
    /// `host:port[,host:port…]`
    pub brokers: String,
    /// How record batches are compressed.
    pub compression: Compression,
    /// How long librdkafka retries a record before reporting it failed.
    pub message_timeout: Duration,
    /// `client.id`, as brokers log the producer.
    pub client_id: String,
    /// Further librdkafka properties (`security.protocol`, `linger.ms`, …).
    pub extra: Vec<(String, String)>,
}

/// How record batches are compressed (`compression.type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[expect(missing_docs, reason = "each variant is the codec it names")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
}

impl Compression {
    /// The librdkafka name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

/// True for librdkafka properties whose values are secrets.
pub fn is_secret_property(key: &str) -> bool {
    ["password", "secret", "key.pem", "sasl.oauthbearer.config", "token"]
        .iter()
        .any(|word| key.contains(word))
}

/// Properties as `Debug` shows them: the values of secret ones replaced.
fn redacted(extra: &[(String, String)]) -> Vec<(&str, &str)> {
    extra
        .iter()
        .map(|(k, v)| (k.as_str(), if is_secret_property(k) { "<redacted>" } else { v.as_str() }))
        .collect()
}

impl std::fmt::Debug for ProducerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra = redacted(&self.extra);
        f.debug_struct("ProducerOptions")
            .field("brokers", &self.brokers)
            .field("compression", &self.compression)
            .field("message_timeout", &self.message_timeout)
            .field("client_id", &self.client_id)
            .field("extra", &extra)
            .finish()
    }
}

/// One record to produce.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// The topic.
    pub topic: String,
    /// The record key (the partition follows it); none for round-robin.
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Record headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// What can go wrong producing to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// librdkafka refused the producer's properties.
    #[error("the Kafka producer's configuration is refused")]
    Config(#[source] KafkaError),
    /// The record could not be queued.
    #[error("Kafka rejected a record for topic {topic}")]
    Produce {
        /// The record's topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    #[error("Kafka did not confirm a record for topic {topic}{}", last_client_error.as_deref().map(|e| format!(" (last client error: {e})")).unwrap_or_default())]
    /// The broker did not acknowledge the record within `message_timeout`, or refused it.
    Delivery {
        /// The record's topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
        /// What the client last reported (an unreachable broker, a TLS failure): why a record
        /// timed out.
        last_client_error: Option<Box<str>>,
    },
    /// A metadata or admin request failed.
    #[error("Kafka admin request failed: {0}")]
    Admin(String),
}

impl Classify for Error {
    /// Poison for a record that can never be produced (too large, invalid topic): dead-letter
    /// material. Everything else is fatal to the pipeline: the producer has already retried
    /// for `message_timeout` before it reports a record failed.
    fn kind(&self) -> ErrorKind {
        if self.is_poison() {
            ErrorKind::Poison
        } else {
            ErrorKind::Fatal
        }
    }
}

impl Error {
    fn is_poison(&self) -> bool {
        let code = match self {
            Error::Produce { source, .. } | Error::Delivery { source, .. } => source.rdkafka_error_code(),
            _ => None,
        };
        matches!(
            code,
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessageSize
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::InvalidTopic
            )
        )
    }
}

/// An idempotent producer.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer<QuietContext>,
    /// Shared with the context: the client's latest error.
    last_error: Arc<Mutex<Option<String>>>,
}

/// librdkafka's logs and client errors, through `tracing`, each distinct message at most once
/// per `REPEAT`: while a broker is down librdkafka reports the same failure several times a
/// second, and the operator needs it once, with a count.
#[derive(Default)]
pub struct QuietContext {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl QuietContext {
    const REPEAT: Duration = Duration::from_secs(30);

    /// Some(repeats suppressed since it was last let through) when `message` may be logged now.
    /// Messages that differ only in numbers and in librdkafka's "(after …)" note are one.
    fn admit(&self, message: &str) -> Option<u64> {
        let message = message.split(" (after ").next().unwrap_or(message);
        let message: String = message.chars().filter(|c| !c.is_ascii_digit()).collect();
        let message = message.as_str();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if seen.len() > 1000 {
            seen.retain(|_, (at, _)| now.duration_since(*at) < Self::REPEAT);
        }
        match seen.get_mut(message) {
            Some((at, suppressed)) if now.duration_since(*at) < Self::REPEAT => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let repeats = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(repeats)
            }
            None => {
                seen.insert(message.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let important = matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
                | RDKafkaLogLevel::Warning
        );
        if !important {
            tracing::debug!(target: "librdkafka", facility, "{message}");
            return;
        }
        if let Some(repeats) = self.admit(message) {
            tracing::warn!(target: "librdkafka", facility, repeats_suppressed = repeats, "{message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let message = format!("{error}: {reason}");
        if !matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
        }
        if let Some(repeats) = self.admit(&message) {
            tracing::warn!(target: "librdkafka", repeats_suppressed = repeats, "Kafka client error: {message}");
        }
    }
}

impl KafkaProducer {
    /// An idempotent producer (`enable.idempotence`, `acks=all`) with these options.
    pub fn new(options: &ProducerOptions) -> Result<Self, Error> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &options.brokers)
            .set("client.id", &options.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("compression.type", options.compression.as_str())
            .set("message.timeout.ms", options.message_timeout.as_millis().to_string())
            .set("linger.ms", "5");
        for (key, value) in &options.extra {
            config.set(key, value);
        }
        let context = QuietContext::default();
        let last_error = Arc::clone(&context.last_error);
        let inner: FutureProducer<QuietContext> =
            config.create_with_context(context).map_err(Error::Config)?;
        Ok(KafkaProducer { inner, last_error })
    }

    /// Enqueues `record`, waiting while librdkafka's local queue is full, and returns a future
    /// that resolves once the broker has it (every in-sync replica), or with the failure.
    pub async fn enqueue(
        &self,
        record: &Record,
    ) -> Result<impl Future<Output = Result<(), Error>> + Send + 'static, Error> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header { key: name, value: Some(value) });
        }
        loop {
            let mut future = FutureRecord::<[u8], [u8]>::to(&record.topic).headers(headers.clone());
            if let Some(key) = &record.key {
                future = future.key(key.as_slice());
            }
            if let Some(payload) = &record.payload {
                future = future.payload(payload.as_slice());
            }
            match self.inner.send_result(future) {
                Ok(delivery) => {
                    let topic = record.topic.clone();
                    let last_error = Arc::clone(&self.last_error);
                    return Ok(async move {
                        let source = match delivery.await {
                            Ok(Ok(_)) => return Ok(()),
                            Ok(Err((source, _))) => source,
                            Err(_) => KafkaError::Canceled,
                        };
                        let last_client_error =
                            last_error.lock().unwrap_or_else(|e| e.into_inner()).as_deref().map(Box::from);
                        Err(Error::Delivery { topic, source, last_client_error })
                    });
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((source, _)) => return Err(Error::Produce { topic: record.topic.clone(), source }),
            }
        }
    }

    /// Whether the broker knows `topic` (a metadata request; a broker that creates topics on
    /// first use creates it).
    pub async fn topic_exists(&self, topic: &str) -> Result<bool, Error> {
        let (producer, topic) = (self.inner.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|source| Error::Produce { topic: topic.clone(), source })?;
            Ok(metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
        })
        .await
        .map_err(|e| Error::Admin(e.to_string()))?
    }

    /// Waits up to `timeout` for everything enqueued to be delivered.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}

/// Creates topics that do not exist yet (an existing topic is fine).
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(Error::Config)?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await
        .map_err(|e| Error::Admin(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(Error::Admin(format!("creating topic {topic}: {code}"))),
        }
    }
    Ok(())
}

/// The offsets consumer group `group` has committed on `topic`'s partitions `0..partitions`,
/// summed (a partition without a commit counts 0): how many records the group has finished
/// on a topic that started empty. Asks the group coordinator without joining the group.
pub fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> Result<i64, Error> {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(Error::Config)?;
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = rdkafka::consumer::Consumer::committed_offsets(&consumer, list, Duration::from_secs(10))
        .map_err(|e| Error::Admin(e.to_string()))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(offset) => offset,
            _ => 0,
        })
        .sum())
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_never_prints_secret_properties() {
        let options = ProducerOptions {
            brokers: "b:9092".into(),
            compression: Compression::Lz4,
            message_timeout: std::time::Duration::from_secs(1),
            client_id: "sluice".into(),
            extra: vec![
                ("sasl.password".into(), "hunter2".into()),
                ("ssl.key.password".into(), "k3y".into()),
                ("linger.ms".into(), "5".into()),
            ],
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("k3y"), "{shown}");
        assert!(shown.contains("linger.ms") && shown.contains("\"5\""), "{shown}");
    }

    use super::*;

    #[test]
    fn a_repeated_client_message_is_let_through_once_per_period_with_its_count() {
        let context = QuietContext::default();
        assert_eq!(context.admit("broker down"), Some(0));
        assert_eq!(context.admit("broker down"), None);
        assert_eq!(context.admit("broker down"), None);
        assert_eq!(context.admit("certificate verify failed"), Some(0), "another message is not held back");
        // Age the first message past the period: it comes through with the repeats it hid.
        context.seen.lock().unwrap().get_mut("broker down").unwrap().0 -= QuietContext::REPEAT;
        assert_eq!(context.admit("broker down"), Some(2));
        assert_eq!(context.admit("broker down"), None);
    }

    #[test]
    fn a_record_kafka_can_never_take_is_poison_and_the_rest_stops_the_pipeline() {
        let produce =
            |code| Error::Produce { topic: "t".into(), source: KafkaError::MessageProduction(code) };
        assert_eq!(produce(RDKafkaErrorCode::MessageSizeTooLarge).kind(), ErrorKind::Poison);
        assert_eq!(produce(RDKafkaErrorCode::InvalidTopic).kind(), ErrorKind::Poison);
        let timed_out = Error::Delivery {
            topic: "t".into(),
            source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            last_client_error: Some("broker down".into()),
        };
        assert_eq!(timed_out.kind(), ErrorKind::Fatal);
        assert_eq!(Error::Admin("x".into()).kind(), ErrorKind::Fatal);
        // The cause is the source, not repeated in the message.
        assert_eq!(
            timed_out.to_string(),
            "Kafka did not confirm a record for topic t (last client error: broker down)"
        );
        assert!(std::error::Error::source(&timed_out).is_some());
    }
}
