//! The Postgres target's configuration and its checks that need no database.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use sluice_core::Problem;

use crate::translate::mapping::MappingFile;
use sluice_postgres::ConnectionConfig;

/// `[target]` with `kind = "postgres"`: rows into tables of a Postgres database.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresTargetConfig {
    /// The target database (it may be the source database: then the target tables must not be
    /// published).
    pub connection: ConnectionConfig,
    /// The Postgres mapping file (`schemas/postgres/README.md`).
    pub mapping: PathBuf,
    /// `schema.table` holding each pipeline's applied position, written in the same transaction
    /// as the rows; created when missing.
    #[serde(default = "default_checkpoint_table")]
    pub checkpoint_table: sluice_core::TableName,
    /// How long connection failures, deadlocks and serialization failures are retried before
    /// the pipeline stops; nothing is confirmed meanwhile.
    #[serde(default = "default_retry_for", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub retry_for: Duration,
    /// A JSON-lines file for rows the target refuses (a value its column type rejects, a
    /// constraint violation); without it they are only logged and counted.
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
    /// How long a statement waits for a lock on a target table (a migration's DDL holding it)
    /// before the batch is retried with a warning.
    #[serde(default = "default_lock_timeout", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub lock_timeout: Duration,
    /// Advance each target column's own sequence (serial or identity) past the highest value
    /// written, in the batch's transaction, so that rows the application inserts after the
    /// cut-over get fresh keys. A sequence is never moved back.
    #[serde(default = "yes")]
    pub sync_sequences: bool,
    /// The way back: the mapping is read inverted (`PgMapping::inverted`). Set by
    /// `Config::reversed`, never in a file.
    #[serde(skip)]
    pub inverted: bool,
}

fn default_lock_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_checkpoint_table() -> sluice_core::TableName {
    sluice_core::TableName::new("public", "sluice_checkpoint")
}

impl PostgresTargetConfig {
    /// Problems visible without either database (the mapping file is read and checked).
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        self.connection.validate("target.connection", problems);
        if let Err(mapping_problems) = self.load_mapping() {
            problems.extend(mapping_problems.into_iter().map(|p| Problem {
                key: if p.key == "mapping" { "target.mapping".into() } else { format!("target.{}", p.key) },
                message: p.message,
            }));
        }
    }
}

impl PostgresTargetConfig {
    /// Reads and checks the mapping file; inverted for the way back.
    pub(crate) fn load_mapping(&self) -> Result<super::mapping::PgMapping, Vec<Problem>> {
        let mapping = super::mapping::PgMapping::load(&self.mapping)?;
        if self.inverted {
            mapping.inverted()
        } else {
            Ok(mapping)
        }
    }
}

fn default_retry_for() -> Duration {
    Duration::from_secs(600)
}

fn yes() -> bool {
    true
}
