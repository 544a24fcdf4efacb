//! `[verify]`: the daemon's background verify, a throttled pass over the mapped tables that
//! keeps the drift metrics current.

use std::time::Duration;

use serde::Deserialize;
use sluice_core::Problem;

/// `[verify]`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Most source rows the background verify reads per second; 0 (the default) turns it off.
    #[serde(default)]
    pub max_rows_per_second: u64,
    /// The fraction of rows a pass checks (0 < f ≤ 1). 1 checks every row and also scans the
    /// target for items no row maps to: the pass then counts as a full verify.
    #[serde(default = "one")]
    pub sample: f64,
    /// The pause between the end of one pass and the start of the next.
    #[serde(default = "default_interval", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub interval: Duration,
    /// Rows per chunk; each chunk is its own short read (no snapshot held across a pass).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: usize,
    /// How long a pass waits for the stream to pass a difference before checking it again.
    #[serde(default = "default_recheck_timeout", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub recheck_timeout: Duration,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            max_rows_per_second: 0,
            sample: one(),
            interval: default_interval(),
            chunk_size: default_chunk_size(),
            recheck_timeout: default_recheck_timeout(),
        }
    }
}

fn one() -> f64 {
    1.0
}
fn default_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_chunk_size() -> usize {
    500
}
fn default_recheck_timeout() -> Duration {
    Duration::from_secs(60)
}

impl VerifyConfig {
    /// Whether the daemon runs the background verify.
    pub fn enabled(&self) -> bool {
        self.max_rows_per_second > 0
    }

    /// Adds a problem for each setting that cannot work.
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        if !(self.sample > 0.0 && self.sample <= 1.0) {
            problems.push(Problem::new("verify", "sample", "must be more than 0 and at most 1"));
        }
        if !(1..=100_000).contains(&self.chunk_size) {
            problems.push(Problem::new("verify", "chunk_size", "must be between 1 and 100000"));
        }
    }
}
