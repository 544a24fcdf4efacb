//! `[source.kafka]`: the topics an applier reads in a consumer group.

use std::time::Duration;

use serde::Deserialize;
use sluice_core::Problem;

use crate::targets::kafka::config::KafkaProperties;

/// `[source.kafka]`: sluice's CDC records (a Kafka target's topics), read in a consumer group.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The topics to read: names, or regular expressions starting with `^` (librdkafka's
    /// subscription patterns, e.g. `"^cdc\\.public\\..*"`).
    pub topics: Vec<String>,
    /// The consumer group: the appliers sharing it share the topics' partitions (one owner per
    /// partition at a time), and its committed offsets are where a restart resumes.
    pub group_id: String,
    /// How long a partition's first record waits for more before its batch goes to the target
    /// (a batch also goes as soon as nothing more is ready, or at `pipeline.batch_max_events`).
    #[serde(default = "default_linger", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub linger: Duration,
    /// How often the offsets of durable records are committed to the group.
    #[serde(default = "default_commit_interval", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub commit_interval: Duration,
    /// When a rebalance takes partitions away, how long this member waits for their batches in
    /// flight to become durable (then commits them) before it lets them go uncommitted.
    #[serde(default = "default_revoke_timeout", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub revoke_timeout: Duration,
    /// Further librdkafka consumer properties (`security.protocol`, `sasl.*`, `ssl.*`,
    /// `session.timeout.ms`, …); `group.id`, `bootstrap.servers` and the commit settings are
    /// sluice's.
    #[serde(default)]
    pub properties: KafkaProperties,
}

fn default_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_revoke_timeout() -> Duration {
    Duration::from_secs(10)
}

impl KafkaSourceConfig {
    /// Problems visible without the broker.
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        if self.brokers.trim().is_empty() {
            problems.push(Problem::new(
                "source.kafka",
                "brokers",
                "must name at least one broker (host:port)",
            ));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            problems.push(Problem::new(
                "source.kafka",
                "topics",
                "must name at least one topic (or a ^pattern)",
            ));
        }
        if self.group_id.trim().is_empty() {
            problems.push(Problem::new("source.kafka", "group_id", "must name the consumer group"));
        }
        for fixed in [
            "group.id",
            "bootstrap.servers",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "enable.partition.eof",
        ] {
            if self.properties.0.contains_key(fixed) {
                problems.push(Problem::new(
                    "source.kafka.properties",
                    fixed,
                    "is set by sluice (offsets are committed only once the target made the records durable)",
                ));
            }
        }
    }

    /// The consumer's options; `batch_max_records` from `pipeline.batch_max_events`, `fencing`
    /// from the target (`TargetConfig::unconditional_writes`).
    pub fn consumer_options(
        &self,
        batch_max_records: usize,
        fencing: Option<Duration>,
    ) -> sluice_kafka::consumer::ConsumerOptions {
        sluice_kafka::consumer::ConsumerOptions {
            brokers: self.brokers.clone(),
            group_id: self.group_id.clone(),
            topics: self.topics.clone(),
            client_id: "sluice-applier".into(),
            batch_max_records,
            linger: self.linger,
            commit_interval: self.commit_interval,
            revoke_timeout: self.revoke_timeout,
            extra: self.properties.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            fencing,
        }
    }
}
