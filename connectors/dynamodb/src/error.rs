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

impl sluice_core::Classify for DynamoError {
    /// A failed guard is no error of its callers (they report it as already applied); should one
    /// reach a retry loop it is not retried.
    fn kind(&self) -> sluice_core::ErrorKind {
        match self.kind {
            ErrorKind::Transient => sluice_core::ErrorKind::Transient,
            ErrorKind::Poison => sluice_core::ErrorKind::Poison,
            ErrorKind::ConditionFailed | ErrorKind::Fatal => sluice_core::ErrorKind::Fatal,
        }
    }
}
