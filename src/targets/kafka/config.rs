//! The Kafka target's configuration and its checks that need no broker.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use sluice_core::Problem;

use crate::translate::outbox::OutboxConfig;

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
/// `[target]` with `kind = "kafka"`.
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topic template for table changes over `{schema}` and `{table}`.
    #[serde(default = "default_kafka_topic")]
    pub topic: String,
    /// Per-table topic overrides: `"public.orders" = "orders-v1"`.
    #[serde(default)]
    pub topics: std::collections::HashMap<String, String>,
    /// Follow a delete (and a key change) with a tombstone for the key, for compacted topics.
    #[serde(default = "yes")]
    pub tombstones_on_delete: bool,
    /// `none`, `gzip`, `snappy` or `lz4` (the default).
    #[serde(default)]
    pub compression: sluice_kafka::Compression,
    /// How long the producer retries a record (broker down, leader moving) before the pipeline
    /// stops; nothing is confirmed meanwhile.
    #[serde(default = "default_retry_for", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub retry_for: Duration,
    /// A JSON-lines file for changes that can never become records (see `dead_letter` of the
    /// DynamoDB target).
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
    /// The outbox event router; without it every change is plain CDC.
    #[serde(default)]
    pub outbox: Option<OutboxConfig>,
    /// Further librdkafka producer properties (`security.protocol`, `sasl.mechanism`,
    /// `linger.ms`, …). Idempotence and `acks` are fixed.
    #[serde(default)]
    pub properties: KafkaProperties,
}

/// librdkafka properties: values of any scalar type are taken as text (an environment
/// override of a numeric password stays a password), and `Debug` hides the values of
/// passwords, secrets and keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub std::collections::BTreeMap<String, String>);

impl KafkaProperties {
    fn is_secret(key: &str) -> bool {
        sluice_kafka::is_secret_property(key)
    }
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.0.iter().map(|(k, v)| (k, if Self::is_secret(k) { "<redacted>" } else { v.as_str() })),
            )
            .finish()
    }
}

impl schemars::JsonSchema for KafkaProperties {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "KafkaProperties".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": { "type": ["string", "number", "boolean"] }
        })
    }
}

impl<'de> Deserialize<'de> for KafkaProperties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Integer(i64),
            Float(f64),
            Bool(bool),
        }
        let map = std::collections::BTreeMap::<String, Scalar>::deserialize(deserializer)?;
        Ok(KafkaProperties(
            map.into_iter()
                .map(|(k, v)| {
                    let text = match v {
                        Scalar::Text(s) => s,
                        Scalar::Integer(i) => i.to_string(),
                        Scalar::Float(f) => f.to_string(),
                        Scalar::Bool(b) => b.to_string(),
                    };
                    (k, text)
                })
                .collect(),
        ))
    }
}

fn default_kafka_topic() -> String {
    "{schema}.{table}".into()
}

impl KafkaConfig {
    /// Problems visible without the broker; `messages`: the source decodes logical messages.
    pub fn validate(&self, messages: bool, problems: &mut Vec<Problem>) {
        if self.brokers.trim().is_empty() {
            problems.push(Problem::new("target", "brokers", "must name at least one broker (host:port)"));
        }
        for fixed in ["enable.idempotence", "acks", "bootstrap.servers"] {
            if self.properties.0.contains_key(fixed) {
                problems.push(Problem::new(
                    "target.properties",
                    fixed,
                    "is set by sluice (idempotent producer, acks=all)",
                ));
            }
        }
        if let Some(outbox) = &self.outbox {
            if !outbox.topic.contains("{aggregatetype}") && outbox.topic.contains('{') {
                problems.push(Problem::new(
                    "target.outbox",
                    "topic",
                    "the only placeholder is {aggregatetype}",
                ));
            }
            if outbox.event_table.is_some() {
                problems.push(Problem::new(
                    "target.outbox",
                    "event_table",
                    "is a DynamoDB setting; Kafka events go to `topic`",
                ));
            }
            if outbox.missing_topic == crate::translate::outbox::MissingTopic::DeadLetter
                && self.dead_letter.is_none()
            {
                problems.push(Problem::new(
                    "target.outbox",
                    "missing_topic",
                    "\"dead_letter\" needs a dead-letter file (target.dead_letter): the events would only be counted",
                ));
            }
            outbox.problems(messages, problems);
        }
    }
}

fn yes() -> bool {
    true
}

fn default_retry_for() -> Duration {
    Duration::from_secs(600)
}
