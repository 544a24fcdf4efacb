//! Configuration problems, each named by the dotted key at fault.

use std::fmt;

/// One configuration problem, named by its dotted key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key at fault (`source.replication.slot`), or the table or column.
    pub key: String,
    /// What is wrong and, where it helps, what is allowed.
    pub message: String,
}

impl Problem {
    /// A problem with `key` under `prefix` (the section: `source.poll`), or at the top when empty.
    pub fn new(prefix: &str, key: &str, message: impl Into<String>) -> Self {
        let key = if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") };
        Problem { key, message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}
