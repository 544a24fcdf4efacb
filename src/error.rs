//! Errors of the daemon core, with the one function that decides what happens after a failure.

/// How a failure is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Try again with backoff; nothing is acknowledged meanwhile.
    Transient,
    /// Stop with a clear message; nothing past the last durable position is acknowledged.
    Fatal,
    /// This one change can never apply: dead-letter it and go on.
    Poison,
}

/// A target failed to make a batch durable.
#[derive(Debug, thiserror::Error)]
#[error("target {target}: {message}")]
pub struct TargetError {
    pub target: &'static str,
    pub kind: ErrorKind,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl TargetError {
    pub fn fatal(
        target: &'static str,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        TargetError {
            target,
            kind: ErrorKind::Fatal,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Why a pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("source failed")]
    Source(#[from] sluice_postgres::Error),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("pipeline task failed: {0}")]
    Task(String),
}
