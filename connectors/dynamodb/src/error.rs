//! One error type for the DynamoDB connector. Its kind is the one [`sluice_core::ErrorKind`];
//! a failed position guard is no error at all (the write reports [`crate::Outcome::AlreadyApplied`]).

pub use sluice_core::ErrorKind;

/// A DynamoDB request failed.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB table {table}: {message}")]
pub struct DynamoError {
    /// Retry, dead-letter or stop.
    pub kind: ErrorKind,
    /// The table the request was for (empty when none).
    pub table: String,
    /// What went wrong, as the service or the client said it (never an item's values).
    pub message: String,
}

impl DynamoError {
    /// An error of `kind` about `table`.
    pub fn new(kind: ErrorKind, table: &str, message: impl Into<String>) -> Self {
        DynamoError { kind, table: table.to_owned(), message: message.into() }
    }

    /// True when trying again may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

impl sluice_core::Classify for DynamoError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}
