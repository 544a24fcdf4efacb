//! One error type for the DynamoDB connector; its kind decides what the target does.

/// How a failure is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The guard's condition failed: the item already holds this position or a newer one.
    ConditionFailed,
    /// Throttling, 5xx, network: retry with backoff.
    Transient,
    /// This item can never be written (too large, invalid value): dead-letter it.
    Poison,
    /// Configuration or permission problem (missing table, bad credentials): stop.
    Fatal,
}

#[derive(Debug, thiserror::Error)]
#[error("DynamoDB table {table}: {message}")]
pub struct DynamoError {
    pub kind: ErrorKind,
    pub table: String,
    pub message: String,
}

impl DynamoError {
    pub fn new(kind: ErrorKind, table: &str, message: impl Into<String>) -> Self {
        DynamoError { kind, table: table.to_owned(), message: message.into() }
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}
