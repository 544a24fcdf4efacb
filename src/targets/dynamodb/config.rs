//! The DynamoDB target's configuration and its checks that need no server.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use sluice_core::{Problem, Secret};

use crate::translate::mapping::MappingFile;
use crate::translate::outbox::OutboxConfig;

/// `[target]` with `kind = "dynamodb"`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DynamoConfig {
    /// The mapping file (format in `schemas/README.md`); optional when `outbox` is set.
    #[serde(default)]
    pub mapping: Option<PathBuf>,
    /// The outbox event router, writing each event as an item of `outbox.event_table`.
    #[serde(default)]
    pub outbox: Option<OutboxConfig>,
    /// A DynamoDB-API endpoint other than AWS's, such as a local server.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// AWS region; otherwise from the environment or profile (us-east-1 when none).
    #[serde(default)]
    pub region: Option<String>,
    /// Static credentials; otherwise the AWS default chain (environment, profile, web identity, instance role).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// The secret of `access_key_id` (never printed).
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Writes in flight at once (items are spread over workers by key; one key stays in order).
    #[serde(default = "default_dynamo_concurrency")]
    pub concurrency: usize,
    /// How long throttling, 5xx and network errors are retried before the pipeline stops.
    #[serde(default = "default_retry_for", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub retry_for: Duration,
    /// How long one request may take before it is retried.
    #[serde(default = "default_dynamo_timeout", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub request_timeout: Duration,
    /// A JSON-lines file receiving writes that can never apply; without it they are only logged and counted.
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
    /// `single`: one conditional PutItem/UpdateItem/DeleteItem per change. `transaction`: the
    /// writes queued for a worker go together in TransactWriteItems requests.
    #[serde(default)]
    pub write_mode: WriteMode,
    /// Most writes in one TransactWriteItems request (DynamoDB allows 100).
    #[serde(default = "default_transaction_size")]
    pub transaction_size: usize,
    /// Most queued writes one worker reads and writes together in `batch` mode (at most 100,
    /// one BatchGetItem).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

/// How items are written (`write_mode`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// One conditional PutItem, UpdateItem or DeleteItem per change (the default).
    #[default]
    Single,
    /// Each source transaction's items in TransactWriteItems, conditional on their positions.
    Transaction,
    /// Versions read with BatchGetItem, then unconditional BatchWriteItem of the newer
    /// writes: fastest, and correct only while sluice is the target items' single writer.
    Batch,
}

fn default_transaction_size() -> usize {
    25
}

fn default_batch_size() -> usize {
    100
}

fn default_dynamo_concurrency() -> usize {
    16
}
fn default_dynamo_timeout() -> Duration {
    Duration::from_secs(10)
}

impl DynamoConfig {
    /// Problems visible without DynamoDB (the mapping file is read and checked);
    /// `messages`: the source decodes logical messages.
    pub fn validate(&self, messages: bool, problems: &mut Vec<Problem>) {
        if !(1..=100).contains(&self.transaction_size) {
            problems.push(Problem::new("target", "transaction_size", "must be between 1 and 100"));
        }
        if !(1..=100).contains(&self.batch_size) {
            problems.push(Problem::new("target", "batch_size", "must be between 1 and 100"));
        }
        if self.concurrency == 0 {
            problems.push(Problem::new("target", "concurrency", "must be at least 1"));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            problems.push(Problem::new(
                "target",
                "access_key_id",
                "access_key_id and secret_access_key go together",
            ));
        }
        match (&self.mapping, &self.outbox) {
            (None, None) => problems.push(Problem::new(
                "target",
                "mapping",
                "is required (a mapping file), unless target.outbox routes outbox events",
            )),
            (Some(path), _) => match super::mapping::Mapping::load(path) {
                Ok(_) => {}
                Err(mapping_problems) => problems.extend(mapping_problems.into_iter().map(|p| Problem {
                    key: if p.key == "mapping" {
                        "target.mapping".into()
                    } else {
                        format!("target.{}", p.key)
                    },
                    message: p.message,
                })),
            },
            (None, Some(_)) => {}
        }
        if let Some(outbox) = &self.outbox {
            match outbox.event_table.as_deref() {
                None | Some("") => problems.push(Problem::new(
                    "target.outbox",
                    "event_table",
                    "is required: the DynamoDB table events are written to",
                )),
                Some(_) => {}
            }
            if outbox.partition_key.is_empty()
                || outbox.sort_key.is_empty()
                || outbox.partition_key == outbox.sort_key
            {
                problems.push(Problem::new(
                    "target.outbox",
                    "sort_key",
                    "partition_key and sort_key must be two different attribute names",
                ));
            }
            outbox.problems(messages, problems);
        }
    }
}

fn default_retry_for() -> Duration {
    Duration::from_secs(600)
}
