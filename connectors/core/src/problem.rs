//! Configuration problems, each named by the dotted key at fault.

use std::fmt;

/// One configuration problem, named by its dotted key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
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
