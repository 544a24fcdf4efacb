//! Kafka connector for sluice: an idempotent producer whose delivery reports tell the pipeline
//! when a record is durable, plus topic administration for set-up and tests.
//!
//! Ordering and durability: the producer runs with `enable.idempotence=true` and `acks=all`, so
//! the broker writes each record once per partition, in the order it was enqueued, and reports
//! delivery only after every in-sync replica has it. Records with the same key go to the same
//! partition (librdkafka's default partitioner hashes the key), which keeps per-key order.
//! While the broker is unreachable librdkafka keeps retrying for `message_timeout`; only then
//! does a delivery fail, and a failed delivery is never reported as durable.

use std::future::Future;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// How to reach the brokers and how to produce.
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// `host:port[,host:port…]`
    pub brokers: String,
    /// `none`, `gzip`, `snappy` or `lz4`.
    pub compression: String,
    /// How long librdkafka retries a record before reporting it failed.
    pub message_timeout: Duration,
    pub client_id: String,
    /// Further librdkafka properties (`security.protocol`, `linger.ms`, …).
    pub extra: Vec<(String, String)>,
}

/// One record to produce.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kafka producer configuration: {0}")]
    Config(#[source] KafkaError),
    #[error("Kafka rejected a record for topic {topic}: {source}")]
    Produce {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("Kafka did not confirm a record for topic {topic}: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("Kafka admin request failed: {0}")]
    Admin(String),
}

impl Error {
    /// A record that can never be produced (too large, invalid topic): dead-letter material.
    pub fn is_poison(&self) -> bool {
        let code = match self {
            Error::Produce { source, .. } | Error::Delivery { source, .. } => source.rdkafka_error_code(),
            _ => None,
        };
        matches!(
            code,
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize | RDKafkaErrorCode::InvalidMessage | RDKafkaErrorCode::InvalidTopic)
        )
    }
}

/// An idempotent producer.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer,
}

impl KafkaProducer {
    pub fn new(options: &ProducerOptions) -> Result<Self, Error> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &options.brokers)
            .set("client.id", &options.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("compression.type", &options.compression)
            .set("message.timeout.ms", options.message_timeout.as_millis().to_string())
            .set("linger.ms", "5");
        for (key, value) in &options.extra {
            config.set(key, value);
        }
        let inner: FutureProducer = config.create().map_err(Error::Config)?;
        Ok(KafkaProducer { inner })
    }

    /// Enqueues `record`, waiting while librdkafka's local queue is full, and returns a future
    /// that resolves once the broker has it (every in-sync replica), or with the failure.
    pub async fn enqueue(&self, record: &Record) -> Result<impl Future<Output = Result<(), Error>> + Send + 'static, Error> {
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
                    return Ok(async move {
                        match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((source, _))) => Err(Error::Delivery { topic, source }),
                            Err(_) => Err(Error::Delivery { topic, source: KafkaError::Canceled }),
                        }
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
            let metadata = producer.client().fetch_metadata(Some(&topic), Duration::from_secs(10)).map_err(|source| Error::Produce { topic: topic.clone(), source })?;
            Ok(metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
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
    let new: Vec<NewTopic> = topics.iter().map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1))).collect();
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
