//! Errors of the daemon core. Their kinds are the one [`ErrorKind`] of `sluice_core`, and
//! [`sluice_core::action`] alone decides what follows from a kind.

pub use sluice_core::{action, Action, Classify, ErrorKind};

/// A target failed to make a batch durable.
#[derive(Debug, thiserror::Error)]
#[error("target {target}: {message}")]
pub struct TargetError {
    /// The target's name (`dynamodb`, `kafka`, …).
    pub target: &'static str,
    /// What follows: retry, dead-letter, stop.
    pub kind: ErrorKind,
    /// What failed, for the operator (never a row's values).
    pub message: String,
    /// The cause.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Classify for TargetError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl TargetError {
    /// A fatal error with its cause.
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
    /// The source stopped with an error.
    #[error("source failed")]
    Source(#[from] sluice_postgres::Error),
    /// The target stopped with an error.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// A task of the pipeline panicked or stopped.
    #[error("pipeline task failed: {0}")]
    Task(String),
    /// The Kafka source stopped; the message names the setting at fault.
    #[error("{message}")]
    Consumer {
        /// What failed, naming the `source.kafka` key.
        message: String,
        /// Why.
        #[source]
        source: sluice_kafka::consumer::ConsumerError,
    },
}

/// Why a one-shot command (`verify`, `reconcile`, `status`, `backfill`) failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command cannot run as configured or asked; the message names the key or table.
    #[error("{0}")]
    Invalid(String),
    /// A read or write failed, after its retries; `what` says which, the cause is the source.
    #[error("{what}")]
    Failed {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl CommandError {
    /// A command that cannot run as asked; `message` names the key or table at fault.
    pub fn invalid(message: impl Into<String>) -> Self {
        CommandError::Invalid(message.into())
    }
}

/// Names what failed, keeping the error as the cause: `.context("cannot read table t")`.
pub trait CommandContext<T> {
    /// `what` failed; the error becomes its source.
    fn context(self, what: impl Into<String>) -> Result<T, CommandError>;
    /// Like `context`, with the message made only on failure.
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, CommandError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> CommandContext<T> for Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T, CommandError> {
        self.map_err(|source| CommandError::Failed { what: what.into(), source: Box::new(source) })
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, CommandError> {
        self.map_err(|source| CommandError::Failed { what: what(), source: Box::new(source) })
    }
}

/// What writing a command's output to standard output came to, with a reader that stopped
/// early (`| head`) counted as success: the output is theirs to cut, and the exit code still
/// tells the outcome.
pub fn reader_gone_ok(written: std::io::Result<()>) -> std::io::Result<()> {
    match written {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes `text` to standard output, as [`reader_gone_ok`] counts it.
pub fn print(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    reader_gone_ok(std::io::stdout().lock().write_all(text.as_bytes()))
}
