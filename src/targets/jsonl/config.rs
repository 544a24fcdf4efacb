//! The jsonl target's configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_core::Problem;

/// `[target]` with `kind = "jsonl"`: one JSON object per change, to a file or standard output.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// A file path, or `-` for standard output.
    #[serde(default = "default_jsonl_path")]
    pub path: PathBuf,
    /// fsync the file after each batch before it counts as durable (ignored for stdout).
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Also write begin and commit records.
    #[serde(default = "yes")]
    pub transactions: bool,
}

impl JsonlConfig {
    /// Problems visible before the file is opened.
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        if self.path != Path::new("-") {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dir.is_dir() {
                    problems.push(Problem::new(
                        "target",
                        "path",
                        format!("directory {} does not exist", dir.display()),
                    ));
                }
            }
        }
    }
}

fn default_jsonl_path() -> PathBuf {
    PathBuf::from("-")
}

fn yes() -> bool {
    true
}
