//! `[backfill]`: the backfill beside the stream.

use std::time::Duration;

use serde::Deserialize;
use sluice_core::{Problem, TableName};

/// `[backfill]`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillConfig {
    /// Serve backfill and reconcile requests while streaming.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Request a backfill of every published table that has never had one, at each start.
    #[serde(default)]
    pub initial: bool,
    /// The progress table in the source database (`schema.table`), created when missing.
    #[serde(default = "default_progress_table")]
    pub progress_table: TableName,
    /// Rows per chunk.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: usize,
    /// Most rows read per second for each table being backfilled; 0 for no limit.
    #[serde(default)]
    pub max_rows_per_second: u64,
    /// Requests served at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Readers of one table at once, each on two connections (watermarks and progress; the
    /// chunks' COPY). A fresh request of a whole table is split into key ranges, four per
    /// reader, which the readers take from one queue; one that started with ranges keeps them.
    /// When not set, the machine's cores, at most 4.
    #[serde(default)]
    #[schemars(range(min = 1, max = 16))]
    pub table_concurrency: Option<usize>,
    /// How often the daemon looks for new requests.
    #[serde(default = "default_poll_interval", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub poll_interval: Duration,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            enabled: true,
            initial: false,
            progress_table: default_progress_table(),
            chunk_size: default_chunk_size(),
            max_rows_per_second: 0,
            concurrency: default_concurrency(),
            table_concurrency: None,
            poll_interval: default_poll_interval(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_progress_table() -> TableName {
    TableName::new("public", "sluice_backfill")
}
fn default_chunk_size() -> usize {
    20_000
}
fn default_concurrency() -> usize {
    1
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(2)
}

impl BackfillConfig {
    /// Adds a problem for each setting that cannot work.
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        if !(1..=100_000).contains(&self.chunk_size) {
            problems.push(Problem::new("backfill", "chunk_size", "must be between 1 and 100000"));
        }
        if self.concurrency == 0 {
            problems.push(Problem::new("backfill", "concurrency", "must be at least 1"));
        }
        if self.table_concurrency.is_some_and(|n| !(1..=16).contains(&n)) {
            problems.push(Problem::new("backfill", "table_concurrency", "must be between 1 and 16"));
        }
        if self.poll_interval.is_zero() {
            problems.push(Problem::new("backfill", "poll_interval", "must be more than 0s"));
        }
    }

    /// Readers of one table at once: `table_concurrency`, or the machine's cores (at most 4).
    pub fn readers_per_table(&self) -> usize {
        self.table_concurrency.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).clamp(1, 4)
        })
    }

    /// The progress table, quoted for SQL.
    pub fn quoted_table(&self) -> String {
        self.progress_table.quoted()
    }
}
