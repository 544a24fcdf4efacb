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

/// Which server among several hosts a connection uses (libpq's `target_session_attrs`, in part).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionAttrs {
    /// The first host that accepts the connection.
    #[default]
    Any,
    /// The first host that is not in recovery.
    Primary,
    /// The first host that is in recovery.
    Standby,
}

impl SessionAttrs {
    /// Whether a server (in recovery or not) is acceptable.
    pub fn accepts(self, in_recovery: bool) -> bool {
        match self {
            SessionAttrs::Any => true,
            SessionAttrs::Primary => !in_recovery,
            SessionAttrs::Standby => in_recovery,
        }
    }

    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
        }
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Host name or address of the server; or several, comma-separated, each with an optional
    /// `:port` (`"pg-a:5432,pg-b:5432"`), tried in order (see `target_session_attrs`). A path
    /// (`"/var/run/postgresql"`) is the directory of the server's Unix-domain socket, as with
    /// libpq; TLS is never used on it.
    #[serde(default = "default_host")]
    pub host: String,
    /// TCP port (of every host without its own).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Which of the hosts to use: the first that accepts the connection (`any`, the default),
    /// the first that is not in recovery (`primary`: after a failover, the promoted standby),
    /// or the first that is (`standby`).
    #[serde(default)]
    pub target_session_attrs: SessionAttrs,
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
/// `<dir>/.s.PGSQL.<port>` when `host` is a directory path.
fn socket_path(host: &str, port: u16) -> Option<std::path::PathBuf> {
    host.starts_with('/').then(|| std::path::Path::new(host).join(format!(".s.PGSQL.{port}")))
}

fn default_user() -> String {
    "postgres".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

impl ConnectionConfig {
    /// `host:port`, for messages (every host's, comma-separated, when there are several); a
    /// Unix-domain socket as its path.
    pub fn addr(&self) -> String {
        match self.servers() {
            Ok(servers) => servers
                .iter()
                .map(|(host, port)| match socket_path(host, *port) {
                    Some(path) => path.display().to_string(),
                    None => format!("{host}:{port}"),
                })
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }

    /// The Unix-domain socket to connect to when `host` is a directory path (as with libpq:
    /// `<host>/.s.PGSQL.<port>`); none for a TCP host.
    pub fn unix_socket(&self) -> Option<std::path::PathBuf> {
        socket_path(&self.host, self.port)
    }

    /// The hosts and ports `host` lists, in order (a directory path stands for that
    /// directory's Unix-domain socket, on `port`).
    pub fn servers(&self) -> Result<Vec<(String, u16)>, String> {
        self.host
            .split(',')
            .map(|entry| {
                let entry = entry.trim();
                let (host, port) = match entry.rsplit_once(':') {
                    // A socket directory takes the common port; a colon in it is part of the path.
                    _ if entry.starts_with('/') => (entry, self.port),
                    // A bare IPv6 address has colons of its own; `[addr]:port` gives it a port.
                    Some((host, port)) if !host.contains(':') || host.starts_with('[') => {
                        let port =
                            port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                                format!("{entry:?}: the port is not a number from 1 to 65535")
                            })?;
                        (host.trim_start_matches('[').trim_end_matches(']'), port)
                    }
                    _ => (entry, self.port),
                };
                if host.is_empty() {
                    return Err(format!("{:?} lists an empty host", self.host));
                }
                Ok((host.to_owned(), port))
            })
            .collect()
    }

    /// Whether connecting needs a choice among hosts, or a look at the server's role.
    pub fn chooses(&self) -> bool {
        self.host.contains(',') || self.target_session_attrs != SessionAttrs::Any
    }

    /// These settings for one of the hosts.
    pub fn single(&self, host: &str, port: u16) -> ConnectionConfig {
        ConnectionConfig {
            host: host.to_owned(),
            port,
            target_session_attrs: SessionAttrs::Any,
            ..self.clone()
        }
    }

    /// Adds a problem for each setting that cannot work, under `prefix`.
    pub fn validate(&self, prefix: &str, problems: &mut Vec<Problem>) {
        if self.host.trim().is_empty() {
            problems.push(Problem::new(prefix, "host", "must not be empty"));
        } else if let Err(reason) = self.servers() {
            problems.push(Problem::new(prefix, "host", reason));
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
    /// pgoutput protocol version: 1; 2 for streamed in-progress transactions; 3 (PG 15+) is 2
    /// with two-phase commit, which sluice does not ask for; 4 (PG 16+) for `streaming = "parallel"`.
    #[serde(default = "default_proto_version")]
    pub proto_version: u8,
    /// Receive large transactions while they are in progress (protocol 2 or later), spilled to
    /// `spill_dir` until their commit is known: `false`, `true`, or `"parallel"` (protocol 4,
    /// PG 16+: the server streams several at once, and an abort carries its LSN and time).
    #[serde(default)]
    pub streaming: Streaming,
    /// Create the slot as a failover slot (PG 17+), which the server synchronises to standbys
    /// with `sync_replication_slots = on`, so a promoted standby still has it; an existing slot
    /// that is not one is altered to be one.
    #[serde(default)]
    pub failover: bool,
    /// `"none"` (PG 16+): the server leaves out changes that were themselves replicated (that
    /// carry any replication origin); `"any"` (default) sends them all.
    #[serde(default)]
    pub origin: OriginFilter,
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
    /// Over TCP, how long the stream's reader may wait before reading the socket again, so
    /// that the server's messages leave it in full segments instead of one segment each (which
    /// costs the walsender's CPU on the source). Only a fast stream waits, and at most this
    /// long per read; a slow one is read at once. `0s` reads as soon as data arrives. At most 50ms.
    #[serde(default = "default_read_coalesce", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub read_coalesce: Duration,
    /// The replication socket's receive buffer in bytes (`SO_RCVBUF`), which bounds the TCP
    /// window. Unset: 32768 to a loopback address while `read_coalesce` is above zero, where
    /// reads are then paced, and the kernel's own sizing otherwise, where reads are not paced
    /// (a fixed buffer caps the stream at buffer / round-trip time). 4096 to 4194304.
    #[serde(default)]
    pub receive_buffer: Option<usize>,
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

/// Whether in-progress transactions are streamed (pgoutput's `streaming` option).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Streaming {
    /// Transactions arrive when they commit.
    #[default]
    Off,
    /// Large transactions arrive in blocks while in progress, one transaction at a time.
    On,
    /// Several in-progress transactions may interleave, and aborts carry their LSN and time.
    Parallel,
}

impl Streaming {
    /// The option's value in START_REPLICATION, when streaming is on.
    pub fn option(self) -> Option<&'static str> {
        match self {
            Streaming::Off => None,
            Streaming::On => Some("on"),
            Streaming::Parallel => Some("parallel"),
        }
    }
}

impl<'de> Deserialize<'de> for Streaming {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Flag(false) => Ok(Streaming::Off),
            Raw::Flag(true) => Ok(Streaming::On),
            Raw::Word(word) => match word.as_str() {
                "off" => Ok(Streaming::Off),
                "on" => Ok(Streaming::On),
                "parallel" => Ok(Streaming::Parallel),
                _ => Err(serde::de::Error::custom(format!(
                    "unknown value {word:?}: expected true, false, \"on\", \"off\" or \"parallel\""
                ))),
            },
        }
    }
}

impl schemars::JsonSchema for Streaming {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Streaming".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "oneOf": [
                { "type": "boolean" },
                { "type": "string", "enum": ["off", "on", "parallel"] }
            ]
        })
    }
}

/// Which changes the server sends by their replication origin (pgoutput's `origin` option).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OriginFilter {
    /// Every change (the default; sluice still drops its own way back's changes by name).
    #[default]
    Any,
    /// Only changes made on this server, none replicated into it (PG 16+).
    None,
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
fn default_read_coalesce() -> Duration {
    Duration::from_millis(10)
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(10)
}

/// The longest `read_coalesce`: each read may wait this long, which adds to latency.
const MAX_READ_COALESCE: Duration = Duration::from_millis(50);

impl ReplicationConfig {
    /// How the stream's socket is read (`read_coalesce`, `receive_buffer`).
    pub fn pacing(&self) -> crate::pacing::Pacing {
        crate::pacing::Pacing { max_wait: self.read_coalesce, receive_buffer: self.receive_buffer }
    }

    /// Settings for `slot` and `publication` with every other key at its default.
    pub fn new(slot: impl Into<String>, publication: impl Into<String>) -> Self {
        ReplicationConfig {
            slot: slot.into(),
            publication: publication.into(),
            create_slot: yes(),
            temporary_slot: false,
            proto_version: default_proto_version(),
            streaming: Streaming::Off,
            failover: false,
            origin: OriginFilter::Any,
            binary: false,
            messages: false,
            status_interval: default_status_interval(),
            read_coalesce: default_read_coalesce(),
            receive_buffer: None,
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
        if !matches!(self.proto_version, 1..=4) {
            problems.push(Problem::new(prefix, "proto_version", "must be 1, 2, 3 or 4"));
        }
        match self.streaming {
            Streaming::On if self.proto_version < 2 => {
                problems.push(Problem::new(prefix, "streaming", "needs proto_version = 2 or later"))
            }
            Streaming::Parallel if self.proto_version < 4 => problems.push(Problem::new(
                prefix,
                "streaming",
                format!("\"parallel\" needs proto_version = 4, not {}", self.proto_version),
            )),
            _ => {}
        }
        if self.failover && self.temporary_slot {
            problems.push(Problem::new(prefix, "failover", "a temporary slot cannot be a failover slot"));
        }
        if self.status_interval.is_zero() {
            problems.push(Problem::new(prefix, "status_interval", "must be greater than zero"));
        }
        if self.read_coalesce > MAX_READ_COALESCE {
            problems.push(Problem::new(
                prefix,
                "read_coalesce",
                "must be at most 50ms (it adds to every change's latency)",
            ));
        }
        if let Some(bytes) = self.receive_buffer {
            if !(4096..=4 << 20).contains(&bytes) {
                problems.push(Problem::new(
                    prefix,
                    "receive_buffer",
                    format!("must be 4096 to 4194304 bytes, not {bytes}"),
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_host(host: &str) -> ConnectionConfig {
        ConnectionConfig {
            host: host.into(),
            port: 5433,
            target_session_attrs: SessionAttrs::Any,
            user: default_user(),
            password: None,
            dbname: "app".into(),
            sslmode: SslMode::default(),
            sslrootcert: None,
            connect_timeout: default_connect_timeout(),
        }
    }

    #[test]
    fn a_directory_path_is_a_unix_socket_and_a_name_is_tcp() {
        let unix = with_host("/var/run/postgresql");
        assert_eq!(unix.unix_socket(), Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5433")));
        assert_eq!(unix.addr(), "/var/run/postgresql/.s.PGSQL.5433");
        // A colon inside a socket path is the path's own.
        let odd = with_host("/run/pg:a");
        assert_eq!(odd.servers().unwrap(), [("/run/pg:a".to_owned(), 5433)]);
        let tcp = with_host("db.internal");
        assert_eq!(tcp.unix_socket(), None);
        assert_eq!(tcp.addr(), "db.internal:5433");
        // Listed together: each its own way.
        let both = with_host("/tmp,db:5432");
        assert_eq!(both.addr(), "/tmp/.s.PGSQL.5433,db:5432");
        assert_eq!(both.single("/tmp", 5433).unix_socket(), Some(PathBuf::from("/tmp/.s.PGSQL.5433")));
    }
}
