//! Connection and replication settings for the Postgres source, with their validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use sluice_core::{Problem, Secret};

/// How the connection uses TLS, with libpq's names.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS, without checking the server's certificate.
    Require,
    /// TLS, certificate checked against `sslrootcert` (or the public web roots) and the host name.
    VerifyFull,
}

/// Where and as whom to connect.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Host name or address of the server.
    #[serde(default = "default_host")]
    pub host: String,
    /// TCP port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The role to log in as.
    #[serde(default = "default_user")]
    pub user: String,
    /// Its password, when the server asks for one.
    #[serde(default)]
    pub password: Option<Secret>,
    /// The database.
    pub dbname: String,
    /// Whether and how TLS is used.
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM file of the certificate authorities trusted with `sslmode = "verify-full"`.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// How long connecting and logging in may take.
    #[serde(default = "default_connect_timeout", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub connect_timeout: Duration,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

impl ConnectionConfig {
    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Adds a problem for each setting that cannot work, under `prefix`.
    pub fn validate(&self, prefix: &str, problems: &mut Vec<Problem>) {
        if self.host.trim().is_empty() {
            problems.push(Problem::new(prefix, "host", "must not be empty"));
        }
        if self.port == 0 {
            problems.push(Problem::new(prefix, "port", "must be between 1 and 65535"));
        }
        if self.user.is_empty() {
            problems.push(Problem::new(prefix, "user", "must not be empty"));
        }
        if self.dbname.is_empty() {
            problems.push(Problem::new(prefix, "dbname", "must not be empty"));
        }
        if self.sslrootcert.is_some() && self.sslmode != SslMode::VerifyFull {
            problems.push(Problem::new(prefix, "sslrootcert", "is only used with sslmode = \"verify-full\""));
        }
        if let Some(path) = &self.sslrootcert {
            if !path.is_file() {
                problems.push(Problem::new(
                    prefix,
                    "sslrootcert",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if self.connect_timeout.is_zero() {
            problems.push(Problem::new(prefix, "connect_timeout", "must be greater than zero"));
        }
    }
}

/// How to stream from the slot.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Replication slot name; created when missing (unless `create_slot = false`), reused when present.
    pub slot: String,
    /// Publication whose tables are streamed. It must exist.
    pub publication: String,
    /// Create the slot when it is missing (else a missing slot is an error).
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// A temporary slot disappears with the connection: no WAL is retained after sluice stops,
    /// and nothing is resumed either. For trials only.
    #[serde(default)]
    pub temporary_slot: bool,
    /// pgoutput protocol version: 1, or 2 for streamed in-progress transactions (PG 14+).
    #[serde(default = "default_proto_version")]
    pub proto_version: u8,
    /// With protocol 2: receive large transactions while they are in progress, spilled to
    /// `spill_dir` until their commit is known.
    #[serde(default)]
    pub streaming: bool,
    /// pgoutput's binary value format (PG 14+). Unknown types then arrive in their binary form.
    #[serde(default)]
    pub binary: bool,
    /// Also deliver `pg_logical_emit_message` messages.
    #[serde(default)]
    pub messages: bool,
    /// How often a standby status update is sent when the server does not ask.
    #[serde(default = "default_status_interval", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub status_interval: Duration,
    /// Where streamed transactions are spilled; the system temp dir when unset.
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
    /// How often a heartbeat (`pg_logical_emit_message` with prefix `sluice.heartbeat`, not
    /// transactional) is written while streaming, so that the slot advances and lag stays
    /// measurable on an idle database. `0s` disables it.
    #[serde(default = "default_heartbeat_interval", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub heartbeat_interval: Duration,
    /// What to do when the slot was invalidated (the server dropped WAL it still needed):
    /// `stop` with an error (default), or `recreate` it, which loses the changes in between
    /// and logs that a backfill is needed.
    #[serde(default)]
    pub on_slot_lost: SlotLostPolicy,
}

/// What to do when the slot was invalidated (`wal_status = lost`): changes are gone.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlotLostPolicy {
    /// Stop with an error naming the slot: an operator decides (the default).
    #[default]
    Stop,
    /// Drop and create the slot and go on from now; what was lost must be backfilled.
    Recreate,
}

fn yes() -> bool {
    true
}
fn default_proto_version() -> u8 {
    1
}
fn default_status_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(10)
}

impl ReplicationConfig {
    /// Settings for `slot` and `publication` with every other key at its default.
    pub fn new(slot: impl Into<String>, publication: impl Into<String>) -> Self {
        ReplicationConfig {
            slot: slot.into(),
            publication: publication.into(),
            create_slot: yes(),
            temporary_slot: false,
            proto_version: default_proto_version(),
            streaming: false,
            binary: false,
            messages: false,
            status_interval: default_status_interval(),
            spill_dir: None,
            heartbeat_interval: default_heartbeat_interval(),
            on_slot_lost: SlotLostPolicy::Stop,
        }
    }

    /// Adds a problem for each setting that cannot work, under `prefix`.
    pub fn validate(&self, prefix: &str, problems: &mut Vec<Problem>) {
        if !is_identifier(&self.slot) {
            problems.push(Problem::new(
                prefix,
                "slot",
                "must be 1-63 characters of lower-case letters, digits and underscores",
            ));
        }
        if self.publication.is_empty() || self.publication.len() > 63 {
            problems.push(Problem::new(prefix, "publication", "must be 1-63 characters"));
        }
        if !matches!(self.proto_version, 1 | 2) {
            problems.push(Problem::new(prefix, "proto_version", "must be 1 or 2"));
        }
        if self.streaming && self.proto_version < 2 {
            problems.push(Problem::new(prefix, "streaming", "needs proto_version = 2"));
        }
        if self.status_interval.is_zero() {
            problems.push(Problem::new(prefix, "status_interval", "must be greater than zero"));
        }
        if let Some(dir) = &self.spill_dir {
            if !dir.is_dir() {
                problems.push(Problem::new(
                    prefix,
                    "spill_dir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
    }
}

/// Replication slot names: what Postgres accepts.
fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
