//! The configuration file: TOML, every table with `deny_unknown_fields`, defaults in one place
//! (the `default_*` functions below and in the connector), environment overrides
//! `SLUICE__SECTION__KEY=value`, and a pure `validate()` whose problems name the dotted key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sluice_core::Problem;

pub use crate::targets::TargetConfig;
use sluice_postgres::{ConnectionConfig, ReplicationConfig};

/// The whole configuration of one sluice process (one pipeline).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub pipeline: PipelineConfig,
    pub source: SourceConfig,
    pub target: TargetConfig,
    #[serde(default)]
    pub monitoring: MonitoringConfig,
    #[serde(default)]
    pub ha: HaConfig,
    #[serde(default)]
    pub backfill: crate::backfill::BackfillConfig,
}

/// `[monitoring]`: the HTTP endpoints and the health thresholds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringConfig {
    /// Address of the HTTP server for /metrics, /healthz, /readyz and /status; empty disables it.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// /readyz answers 503 while the lag exceeds this (with heartbeats on).
    #[serde(default = "default_ready_max_lag", with = "sluice_core::duration")]
    pub ready_max_lag: Duration,
    /// How often the slot is inspected in pg_replication_slots.
    #[serde(default = "default_slot_check_interval", with = "sluice_core::duration")]
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

fn default_listen() -> String {
    "0.0.0.0:9187".into()
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
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Hold a Postgres advisory lock (named after the slot) while streaming; replicas without
    /// it stand by.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often a standby tries to take the lock.
    #[serde(default = "default_ha_retry_interval", with = "sluice_core::duration")]
    pub retry_interval: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig { enabled: true, retry_interval: default_ha_retry_interval() }
    }
}

fn default_ha_retry_interval() -> Duration {
    Duration::from_secs(1)
}

#[derive(Clone, Debug, Deserialize)]
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
    #[serde(default = "default_retry_for", with = "sluice_core::duration")]
    pub retry_for: Duration,
    /// On SIGTERM/SIGINT, how long to wait for in-flight batches before exiting.
    #[serde(default = "default_shutdown_timeout", with = "sluice_core::duration")]
    pub shutdown_timeout: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            name: default_pipeline_name(),
            batch_max_events: default_batch_max_events(),
            max_in_flight: default_max_in_flight(),
            retry_for: default_retry_for(),
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
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

/// The Postgres source: logical replication (`[source.replication]`), or polling an outbox
/// table (`[source.poll]`) where logical replication is not allowed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub connection: ConnectionConfig,
    #[serde(default)]
    pub replication: Option<ReplicationConfig>,
    #[serde(default)]
    pub poll: Option<sluice_postgres::PollConfig>,
}

impl SourceConfig {
    /// The name of the HA lock: one per slot, or per polled table.
    pub fn lock_name(&self) -> String {
        match (&self.replication, &self.poll) {
            (Some(replication), _) => replication.slot.clone(),
            (None, Some(poll)) => poll.lock_name(),
            (None, None) => String::new(),
        }
    }

    /// True when logical messages are decoded (`source.replication.messages`).
    fn messages(&self) -> bool {
        self.replication.as_ref().is_some_and(|r| r.messages)
    }
}

fn yes() -> bool {
    true
}

/// Reading or checking the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<Problem> },
}

const ENV_PREFIX: &str = "SLUICE__";

impl Config {
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
            message: format!("not valid TOML: {}", e.message()),
        })?;
        Config::from_table(table, env)
    }

    fn from_table(
        mut table: toml::Table,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        apply_env_overrides(&mut table, env, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { problems });
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { "(top level)".to_owned() } else { key };
            ConfigError::Invalid {
                problems: vec![Problem { key, message: e.into_inner().message().to_owned() }],
            }
        })?;
        let problems = config.validate();
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
        if !self.monitoring.listen.is_empty()
            && self.monitoring.listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(Problem::new(
                "monitoring",
                "listen",
                "must be an address such as 0.0.0.0:9187, or empty to disable",
            ));
        }
        if self.monitoring.slot_check_interval.is_zero() {
            problems.push(Problem::new("monitoring", "slot_check_interval", "must be more than 0s"));
        }
        self.backfill.validate(&mut problems);
        if self.ha.retry_interval.is_zero() {
            problems.push(Problem::new("ha", "retry_interval", "must be more than 0s"));
        }
        self.source.connection.validate("source.connection", &mut problems);
        match (&self.source.replication, &self.source.poll) {
            (Some(replication), None) => replication.validate("source.replication", &mut problems),
            (None, Some(poll)) => {
                poll.validate("source.poll", &mut problems);
                match self.target.outbox() {
                    Some(outbox) if outbox.table.as_deref() == Some(poll.table.as_str()) => {}
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
            (None, None) => problems.push(Problem::new(
                "source",
                "replication",
                "configure [source.replication] (logical replication) or [source.poll] (an outbox table)",
            )),
            (Some(_), Some(_)) => problems.push(Problem::new(
                "source",
                "poll",
                "[source.replication] and [source.poll] exclude each other: one source per pipeline",
            )),
        }
        self.target.validate(self.source.messages(), &mut problems);
        problems
    }
}

/// `SLUICE__SOURCE__CONNECTION__PASSWORD=x` sets `source.connection.password = "x"`. Values
/// that read as TOML integers, floats or booleans keep that type; anything else is a string.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<Problem>,
) {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else { continue };
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if keys.iter().any(String::is_empty) {
            problems.push(Problem {
                key: name.clone(),
                message: "environment override has an empty key segment".into(),
            });
            continue;
        }
        if let Err(message) = set_path(table, &keys, parse_env_value(&raw)) {
            problems.push(Problem { key: keys.join("."), message: format!("{name}: {message}") });
        }
    }
}

/// Sets `keys` (a dotted path) in `table`, creating tables on the way.
fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (first, rest) = keys.split_first().expect("at least one segment");
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    match table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
        toml::Value::Table(inner) => set_path(inner, rest, value),
        _ => Err(format!("{first} is not a table, so it cannot hold {}", rest.join("."))),
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    if let Ok(f) = raw.parse::<f64>() {
        if raw.contains('.') {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [source.connection]
        dbname = "app"
        [source.replication]
        slot = "sluice"
        publication = "sluice_pub"
        [target]
        kind = "null"
    "#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            Path::new("test.toml"),
        )
    }

    #[test]
    fn json_config_reads_like_toml_with_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.json");
        std::fs::write(
            &path,
            r#"{"source": {"connection": {"dbname": "app", "port": 6432}, "replication": {"slot": "s", "publication": "p"}},
                "target": {"kind": "null"}, "monitoring": {"listen": "0.0.0.0:9187"}}"#,
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.source.connection.port, 6432);
        assert_eq!(config.monitoring.listen, "0.0.0.0:9187");
        std::fs::write(&path, r#"{"source": {"connection": {"dbname": "app", "port": 6432.5}}}"#).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("source.connection.port"), "{err}");
        std::fs::write(&path, "{").unwrap();
        assert!(Config::load(&path).unwrap_err().to_string().contains("not valid JSON"));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = load(MINIMAL, &[]).unwrap();
        assert_eq!(config.source.connection.port, 5432);
        assert_eq!(config.pipeline.max_in_flight, 4);
        assert!(matches!(config.target, TargetConfig::Null));
    }

    #[test]
    fn environment_overrides_nested_keys_with_types() {
        let config = load(
            MINIMAL,
            &[
                ("SLUICE__SOURCE__CONNECTION__PORT", "6543"),
                ("SLUICE__SOURCE__CONNECTION__PASSWORD", "s3cret"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(config.source.connection.port, 6543);
        assert_eq!(config.source.connection.password.as_ref().unwrap().expose(), "s3cret");
        assert!(!format!("{config:?}").contains("s3cret"), "the password must not print");
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = MINIMAL.replace("dbname = \"app\"", "dbname = \"app\"\nhots = \"x\"");
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("source.connection") && err.contains("hots"), "{err}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_key() {
        let text = MINIMAL
            .replace("slot = \"sluice\"", "slot = \"Bad-Slot\"\nstreaming = true\nstatus_interval = \"0s\"")
            + "\n[pipeline]\nmax_in_flight = 0\n";
        let ConfigError::Invalid { problems } = load(&text, &[]).unwrap_err() else {
            panic!("expected problems")
        };
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "pipeline.max_in_flight",
                "source.replication.slot",
                "source.replication.streaming",
                "source.replication.status_interval"
            ]
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = MINIMAL.replace(
            "publication = \"sluice_pub\"",
            "publication = \"sluice_pub\"\nstatus_interval = \"10\"",
        );
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("source.replication.status_interval") && err.contains("unit"), "{err}");
    }

    #[test]
    fn a_dynamodb_target_needs_a_mapping_or_an_outbox_with_an_event_table() {
        let dynamo = MINIMAL.replace("kind = \"null\"", "kind = \"dynamodb\"");
        let err = load(&dynamo, &[]).unwrap_err().to_string();
        assert!(err.contains("target.mapping: is required"), "{err}");
        let err = load(&format!("{dynamo}\n[target.outbox]\ntable = \"public.outbox\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("target.outbox.event_table: is required"), "{err}");
        let config = load(
            &format!("{dynamo}\n[target.outbox]\ntable = \"public.outbox\"\nevent_table = \"events\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(config.target.outbox().and_then(|o| o.event_table.as_deref()), Some("events"));
    }

    #[test]
    fn a_pipeline_has_exactly_one_source_and_a_polled_table_is_the_outbox_table() {
        let neither = MINIMAL.replace(
            "[source.replication]\n        slot = \"sluice\"\n        publication = \"sluice_pub\"\n",
            "",
        );
        let err = load(&neither, &[]).unwrap_err().to_string();
        assert!(
            err.contains(
                "source.replication: configure [source.replication] (logical replication) or [source.poll]"
            ),
            "{err}"
        );
        let both = MINIMAL.replace("[target]", "[source.poll]\ntable = \"public.outbox\"\n[target]");
        let err = load(&both, &[]).unwrap_err().to_string();
        assert!(
            err.contains("source.poll: [source.replication] and [source.poll] exclude each other"),
            "{err}"
        );
        let kafka =
            "[target]\nkind = \"kafka\"\nbrokers = \"k:9092\"\n[target.outbox]\ntable = \"public.outbox\"\n";
        let poll =
            |poll: &str| format!("[source.connection]\ndbname = \"app\"\n[source.poll]\n{poll}\n{kafka}");
        let config = load(&poll("table = \"public.outbox\"\ninterval = \"250ms\""), &[]).unwrap();
        let polled = config.source.poll.as_ref().unwrap();
        assert_eq!(
            (polled.batch_size, polled.interval, polled.after_publish),
            (500, Duration::from_millis(250), sluice_postgres::AfterPublish::Delete)
        );
        assert_eq!(config.source.lock_name(), "poll:public.outbox");
        let err = load(&poll("table = \"public.events\"\nbatch_size = 0"), &[]).unwrap_err().to_string();
        assert!(
            err.contains("source.poll.batch_size")
                && err.contains("source.poll.table: must be the table of target.outbox.table"),
            "{err}"
        );
    }

    #[test]
    fn kafka_properties_take_any_scalar_and_hide_secrets() {
        let text = "[source.connection]\ndbname = \"app\"\n[source.replication]\nslot = \"s\"\npublication = \"p\"\n\
                    [target]\nkind = \"kafka\"\nbrokers = \"k:9092\"\n[target.properties]\n\"linger.ms\" = 20\n";
        let config = load(text, &[("SLUICE__TARGET__PROPERTIES__SASL.PASSWORD", "12345")]).unwrap();
        let TargetConfig::Kafka(kafka) = &config.target else { panic!("kafka") };
        assert_eq!(kafka.properties.0.get("linger.ms").map(String::as_str), Some("20"));
        assert_eq!(kafka.properties.0.get("sasl.password").map(String::as_str), Some("12345"));
        assert!(!format!("{config:?}").contains("12345"), "{config:?}");
    }
}
