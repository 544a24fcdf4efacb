//! Errors of the daemon core. Their kinds are the one [`ErrorKind`] of `sluice_core`, and
//! [`sluice_core::action`] alone decides what follows from a kind.

pub use sluice_core::{action, Action, Classify, ErrorKind};

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

impl Classify for TargetError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
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
