//! The configuration file: TOML, every table with `deny_unknown_fields`, defaults in one place
//! (the `default_*` functions below and in the connector), environment overrides
//! `SLUICE__SECTION__KEY=value`, and a pure `validate()` whose problems name the dotted key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod backfill;
mod env;
pub mod schema;
mod verify;

pub use backfill::BackfillConfig;
use env::apply_env_overrides;
use sluice_core::{Problem, TableName};
pub use verify::VerifyConfig;

pub use crate::targets::TargetConfig;
use sluice_postgres::{ConnectionConfig, ReplicationConfig};

/// The whole configuration of one sluice process (one pipeline).
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Batching, retries, shutdown.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Where changes come from.
    pub source: SourceConfig,
    /// Where they go.
    pub target: TargetConfig,
    /// The HTTP endpoints and health thresholds.
    #[serde(default)]
    pub monitoring: MonitoringConfig,
    /// High availability: one active replica per slot.
    #[serde(default)]
    pub ha: HaConfig,
    /// Backfill beside the stream.
    #[serde(default)]
    pub backfill: BackfillConfig,
    /// The daemon's background verify (off unless `max_rows_per_second` is set).
    #[serde(default)]
    pub verify: VerifyConfig,
    /// The migration state: tables' phases and the fence.
    #[serde(default)]
    pub migration: crate::migration::MigrationConfig,
    /// Set on the way back's configuration (`migration::reverse::reversed`), never in a file.
    #[serde(skip)]
    pub reverse_of: Option<crate::migration::reverse::ReverseOf>,
}

/// `[monitoring]`: the HTTP endpoints and the health thresholds.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitoringConfig {
    /// Address of the HTTP server for /metrics, /healthz, /readyz and /status; empty (none)
    /// disables it.
    #[serde(default = "default_listen", deserialize_with = "listen_address")]
    #[schemars(schema_with = "listen_schema")]
    pub listen: Option<SocketAddr>,
    /// /readyz answers 503 while the lag exceeds this (with heartbeats on).
    #[serde(default = "default_ready_max_lag", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub ready_max_lag: Duration,
    /// How often the slot is inspected in pg_replication_slots.
    #[serde(
        default = "default_slot_check_interval",
        deserialize_with = "sluice_core::duration::deserialize"
    )]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub slot_check_interval: Duration,
    /// A warning is logged while the slot retains more WAL than this.
    #[serde(default = "default_retained_wal_warn_bytes")]
    pub retained_wal_warn_bytes: u64,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            listen: default_listen(),
            ready_max_lag: default_ready_max_lag(),
            slot_check_interval: default_slot_check_interval(),
            retained_wal_warn_bytes: default_retained_wal_warn_bytes(),
        }
    }
}

fn default_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 9187)))
}

/// An address such as `0.0.0.0:9187`, or the empty string for none.
fn listen_address<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom("must be an address such as 0.0.0.0:9187, or empty to disable"))
}
fn listen_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "pattern": "^$|^.+:[0-9]+$" })
}
fn default_ready_max_lag() -> Duration {
    Duration::from_secs(60)
}
fn default_slot_check_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_retained_wal_warn_bytes() -> u64 {
    8 << 30
}

/// `[ha]`: several replicas of one pipeline, one of which streams.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Hold a Postgres advisory lock (named after the slot) while streaming; replicas without
    /// it stand by.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often a standby tries to take the lock.
    #[serde(default = "default_ha_retry_interval", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub retry_interval: Duration,
    /// The table in the source database (`schema.table`, created when missing) where the
    /// holder of the lock records that it holds it, and that it released it cleanly: a
    /// replica that takes over from one that did not waits out its fencing delay before an
    /// unconditional write (DynamoDB `write_mode = "batch"`).
    #[serde(default = "default_ha_state_table")]
    pub state_table: TableName,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            enabled: true,
            retry_interval: default_ha_retry_interval(),
            state_table: default_ha_state_table(),
        }
    }
}

fn default_ha_state_table() -> TableName {
    TableName::new("public", "sluice_ha")
}

fn default_ha_retry_interval() -> Duration {
    Duration::from_secs(1)
}

/// `[pipeline]`: how changes move through sluice.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Names the pipeline in logs and metrics.
    #[serde(default = "default_pipeline_name")]
    pub name: String,
    /// Most events in one batch handed to the target.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// Batches submitted to the target and not yet durable, at most.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How long transient source failures are retried before sluice stops with an error.
    #[serde(default = "default_retry_for", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub retry_for: Duration,
    /// On SIGTERM/SIGINT, how long to wait for in-flight batches before exiting.
    #[serde(default = "default_shutdown_timeout", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub shutdown_timeout: Duration,
    /// `run` streams despite the start checks' warnings (a published table no mapping
    /// names, a table whose updates Postgres rejects); their problems always stop it.
    #[serde(default)]
    pub allow_warnings: bool,
    /// Where the progress inside a large transaction is kept, in the source database (its
    /// primary when the source is a standby), created when missing: a restart then skips the
    /// changes of a replayed transaction that DynamoDB, Kafka or a JSON-lines file already has.
    #[serde(default = "default_checkpoint_table")]
    pub checkpoint_table: sluice_core::TableName,
    /// How often that progress is written, at most; `0s` never writes it.
    #[serde(
        default = "default_checkpoint_interval",
        deserialize_with = "sluice_core::duration::deserialize"
    )]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub checkpoint_interval: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            name: default_pipeline_name(),
            batch_max_events: default_batch_max_events(),
            max_in_flight: default_max_in_flight(),
            retry_for: default_retry_for(),
            shutdown_timeout: default_shutdown_timeout(),
            allow_warnings: false,
            checkpoint_table: default_checkpoint_table(),
            checkpoint_interval: default_checkpoint_interval(),
        }
    }
}

fn default_checkpoint_table() -> sluice_core::TableName {
    sluice_core::TableName::new("public", "sluice_checkpoint")
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_pipeline_name() -> String {
    "default".into()
}
fn default_batch_max_events() -> usize {
    4096
}
fn default_max_in_flight() -> usize {
    4
}
fn default_retry_for() -> Duration {
    Duration::from_secs(300)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The source: Postgres logical replication (`[source.replication]`), polling an outbox table
/// (`[source.poll]`) where logical replication is not allowed, or sluice's own CDC records in
/// Kafka topics (`[source.kafka]`, an applier in a consumer group). Exactly one of the three.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// How to reach the source database. With `[source.kafka]` there is none and this is an
    /// empty placeholder: the commands that read the source database refuse such a
    /// configuration (`SourceConfig::database`).
    pub connection: ConnectionConfig,
    /// The primary, when `connection` is a standby: heartbeats are written there.
    pub heartbeat_connection: Option<ConnectionConfig>,
    /// How changes are read.
    pub mode: SourceMode,
}

/// How the source reads changes.
#[derive(Clone, Debug)]
pub enum SourceMode {
    /// A replication slot on a publication (`[source.replication]`).
    Replication(ReplicationConfig),
    /// An outbox table polled in commit order (`[source.poll]`).
    Poll(sluice_postgres::PollConfig),
    /// sluice's CDC records in Kafka topics, read in a consumer group (`[source.kafka]`).
    Kafka(crate::sources::kafka::KafkaSourceConfig),
}

/// `[source]` as written: both ways are optional in the file, exactly one in the config.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SourceFields {
    /// How to reach the source database (not with `kafka`).
    #[serde(default)]
    connection: Option<ConnectionConfig>,
    /// With `connection` pointing at a hot standby (decoding on a standby, PG 16+): the
    /// primary, where heartbeats are written (a standby cannot write WAL) and which creating
    /// the slot asks for a snapshot record.
    #[serde(default)]
    heartbeat_connection: Option<ConnectionConfig>,
    /// Logical replication: a slot on a publication.
    #[serde(default)]
    replication: Option<ReplicationConfig>,
    /// An outbox table polled in commit order, where logical replication is not allowed.
    #[serde(default)]
    poll: Option<sluice_postgres::PollConfig>,
    /// sluice's CDC records in Kafka topics (a Kafka target's), read by appliers in a consumer
    /// group: the apply side scaled out over the topics' partitions.
    #[serde(default)]
    kafka: Option<crate::sources::kafka::KafkaSourceConfig>,
}

impl schemars::JsonSchema for SourceConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SourceConfig".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut schema = SourceFields::json_schema(generator);
        // One of the two (that both are not set is left to sluice's own message: a values
        // file cannot unset the chart's default `replication` but with null).
        schema.insert(
            "anyOf".into(),
            serde_json::json!([
                { "required": ["connection", "replication"] },
                { "required": ["connection", "poll"] },
                { "required": ["kafka"] }
            ]),
        );
        schema
    }
}

const NO_SOURCE: &str =
    "configure [source.replication] (logical replication), [source.poll] (an outbox table) \
     or [source.kafka] (sluice's records in Kafka topics)";
const TWO_SOURCES: &str =
    "[source.replication], [source.poll] and [source.kafka] exclude each other: one source per pipeline";
const NO_CONNECTION: &str = "the source database: required with [source.replication] and [source.poll]";
const KAFKA_CONNECTION: &str =
    "[source.kafka] reads no database: remove source.connection (the target has its own)";

impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let fields = SourceFields::deserialize(deserializer)?;
        let mode = match (fields.replication, fields.poll, fields.kafka) {
            (Some(replication), None, None) => SourceMode::Replication(replication),
            (None, Some(poll), None) => SourceMode::Poll(poll),
            (None, None, Some(kafka)) => SourceMode::Kafka(kafka),
            (None, None, None) => return Err(D::Error::custom(NO_SOURCE)),
            _ => return Err(D::Error::custom(TWO_SOURCES)),
        };
        let connection = match (fields.connection, &mode) {
            (Some(_), SourceMode::Kafka(_)) => return Err(D::Error::custom(KAFKA_CONNECTION)),
            (None, SourceMode::Kafka(_)) => no_database(),
            (Some(connection), _) => connection,
            (None, _) => return Err(D::Error::missing_field("connection")),
        };
        Ok(SourceConfig { connection, heartbeat_connection: fields.heartbeat_connection, mode })
    }
}

/// The problem with `[source]` when it does not name exactly one way to read, by the key at
/// fault (found before deserializing, so that the message names `source.replication` or
/// `source.poll` rather than `source`).
fn source_choice(table: &toml::Table) -> Option<Problem> {
    let source = table.get("source")?.as_table()?;
    let ways = ["replication", "poll", "kafka"].map(|way| source.contains_key(way));
    match ways {
        [false, false, false] => Some(Problem::new("source", "replication", NO_SOURCE)),
        [_, _, true] if source.contains_key("connection") => {
            Some(Problem::new("source", "connection", KAFKA_CONNECTION))
        }
        [_, _, false] if !source.contains_key("connection") => {
            Some(Problem::new("source", "connection", NO_CONNECTION))
        }
        [true, true, _] => Some(Problem::new("source", "poll", TWO_SOURCES)),
        [_, true, true] | [true, _, true] => Some(Problem::new("source", "kafka", TWO_SOURCES)),
        _ => None,
    }
}

/// The placeholder connection of a source that reads no database (`[source.kafka]`).
fn no_database() -> ConnectionConfig {
    toml::from_str("dbname = \"\"").expect("dbname is the only required key")
}

impl SourceConfig {
    /// The name of the HA lock: one per slot, or per polled table.
    pub fn lock_name(&self) -> String {
        match &self.mode {
            SourceMode::Replication(replication) => replication.slot.clone(),
            SourceMode::Poll(poll) => poll.lock_name(),
            SourceMode::Kafka(kafka) => format!("kafka-{}", kafka.group_id),
        }
    }

    /// The Kafka source's settings, when the source is sluice's records in Kafka.
    pub fn kafka(&self) -> Option<&crate::sources::kafka::KafkaSourceConfig> {
        match &self.mode {
            SourceMode::Kafka(kafka) => Some(kafka),
            _ => None,
        }
    }

    /// Whether the source is a Postgres database (replication or polling): the commands that
    /// read or write the source database need one.
    pub fn is_database(&self) -> bool {
        !matches!(self.mode, SourceMode::Kafka(_))
    }

    /// The replication settings, when the source is a replication slot.
    pub fn replication(&self) -> Option<&ReplicationConfig> {
        match &self.mode {
            SourceMode::Replication(replication) => Some(replication),
            SourceMode::Poll(_) | SourceMode::Kafka(_) => None,
        }
    }

    /// The polling settings, when the source is a polled outbox table.
    pub fn poll(&self) -> Option<&sluice_postgres::PollConfig> {
        match &self.mode {
            SourceMode::Poll(poll) => Some(poll),
            SourceMode::Replication(_) | SourceMode::Kafka(_) => None,
        }
    }

    /// True when logical messages are decoded (`source.replication.messages`).
    fn messages(&self) -> bool {
        self.replication().is_some_and(|r| r.messages)
    }
}

fn yes() -> bool {
    true
}

/// Reading or checking the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML (or JSON).
    #[error("config file {path} is {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser says, and where.
        message: String,
    },
    /// Keys at fault, each with its problem.
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The problems, in file order.
        problems: Vec<Problem>,
    },
}

/// A TOML error as its message and where it is (line and column), never the text around it:
/// a configuration can hold a password. Some errors (a NUL byte in a comment) have no message
/// of their own.
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = if e.message().is_empty() { "unexpected character" } else { e.message() };
    match e.span() {
        Some(span) if span.start <= text.len() => {
            let before = &text.as_bytes()[..span.start];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("{message} (line {line}, column {column})")
        }
        _ => message.to_owned(),
    }
}

impl Config {
    /// sluice's own tables in the source database (checkpoints, backfill progress, the HA
    /// state): bookkeeping, never data, even under a publication FOR ALL TABLES.
    pub fn own_tables(&self) -> [&TableName; 3] {
        [&self.pipeline.checkpoint_table, &self.backfill.progress_table, &self.ha.state_table]
    }

    /// Reads `path` (TOML; JSON of the same shape when the name ends in `.json`, as rendered
    /// by the Helm chart), applies `SLUICE__…` overrides from the process environment and
    /// validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        if path.extension().is_some_and(|e| e == "json") {
            let table: toml::Table = serde_json::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.into(),
                message: format!("not valid JSON: {e}"),
            })?;
            return Config::from_table(table, std::env::vars());
        }
        Config::from_toml(&text, std::env::vars(), path)
    }

    /// Parses, overrides and validates; `path` only names the file in messages.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        path: &Path,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.into(),
            message: format!("not valid TOML: {}", toml_error(text, &e)),
        })?;
        Config::from_table(table, env)
    }

    fn from_table(
        mut table: toml::Table,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let overridden = apply_env_overrides(&mut table, env, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { problems });
        }
        let choice = source_choice(&table);
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { "(top level)".to_owned() } else { key };
            let message = toml_error("", &e.into_inner());
            // The choice of source, named by its key, in place of serde's `source`.
            let named = choice.is_some();
            let mut problems: Vec<Problem> = choice.into_iter().collect();
            let said = [NO_SOURCE, TWO_SOURCES, KAFKA_CONNECTION].contains(&message.as_str())
                || message.starts_with("missing field `connection`");
            if !(named && key == "source" && said) {
                problems.push(Problem { key, message });
            }
            env::name_overrides(&mut problems, &overridden);
            ConfigError::Invalid { problems }
        })?;
        let mut problems = config.validate();
        env::name_overrides(&mut problems, &overridden);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// Every problem with the configuration, each named by its dotted key.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let p = &self.pipeline;
        if p.name.is_empty() || !p.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            problems.push(Problem::new("pipeline", "name", "must be letters, digits, '-' or '_'"));
        }
        if p.batch_max_events == 0 {
            problems.push(Problem::new("pipeline", "batch_max_events", "must be at least 1"));
        }
        if p.max_in_flight == 0 {
            problems.push(Problem::new("pipeline", "max_in_flight", "must be at least 1"));
        }
        if self.monitoring.slot_check_interval.is_zero() {
            problems.push(Problem::new("monitoring", "slot_check_interval", "must be more than 0s"));
        }
        self.backfill.validate(&mut problems);
        self.verify.validate(&mut problems);
        self.migration.validate(&mut problems);
        if self.ha.retry_interval.is_zero() {
            problems.push(Problem::new("ha", "retry_interval", "must be more than 0s"));
        }
        if self.source.is_database() {
            self.source.connection.validate("source.connection", &mut problems);
        }
        if let Some(primary) = &self.source.heartbeat_connection {
            primary.validate("source.heartbeat_connection", &mut problems);
            if self.source.replication().is_none() {
                problems.push(Problem::new(
                    "source",
                    "heartbeat_connection",
                    "is for a replication source on a standby; [source.poll] reads no slot",
                ));
            }
        }
        match &self.source.mode {
            SourceMode::Replication(replication) => replication.validate("source.replication", &mut problems),
            SourceMode::Poll(poll) => {
                poll.validate("source.poll", &mut problems);
                match self.target.outbox() {
                    Some(outbox) if outbox.table.as_ref() == Some(&poll.table) => {}
                    Some(_) => problems.push(Problem::new(
                        "source.poll",
                        "table",
                        "must be the table of target.outbox.table",
                    )),
                    None => problems.push(Problem::new(
                        "source.poll",
                        "table",
                        "polled rows are outbox events: configure [target.outbox] with the same table",
                    )),
                }
            }
            SourceMode::Kafka(kafka) => {
                kafka.validate(&mut problems);
                if matches!(self.target, TargetConfig::Kafka(_)) {
                    problems.push(Problem::new(
                        "target",
                        "kind",
                        "an applier reading [source.kafka] applies to dynamodb or postgres (or jsonl, null), not back to Kafka",
                    ));
                }
                if self.target.outbox().is_some() {
                    problems.push(Problem::new(
                        "target",
                        "outbox",
                        "an applier reads sluice's CDC records, not outbox events",
                    ));
                }
            }
        }
        self.target.validate(self.source.messages(), &mut problems);
        problems
    }
}

#[cfg(test)]
mod tests;
