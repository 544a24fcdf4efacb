//! One error type for the Postgres connector, classified under the one error policy.

use std::io;

use sluice_core::lsn::Lsn;
use sluice_core::{Classify, ErrorKind};

/// Everything that can go wrong talking to Postgres.
#[derive(Debug, thiserror::Error)]
#[expect(missing_docs, reason = "each variant's message says what it is; fields are named by it")]
pub enum Error {
    #[error("cannot connect to Postgres at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to Postgres was lost")]
    ConnectionLost(#[source] io::Error),
    #[error("TLS with Postgres at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("Postgres refused the login of user {user:?}: {message}")]
    Auth { user: String, message: String },
    #[error("Postgres error {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server { code: String, message: String, detail: Option<String> },
    /// Set-up found the server unable to serve this pipeline (wal_level, publication, slot).
    #[error("{0}")]
    Setup(String),
    #[error("replication slot {slot:?} is in use by another client{}; only one consumer may stream from a slot", pid.map(|p| format!(" (server process {p})")).unwrap_or_default())]
    SlotInUse { slot: String, pid: Option<i32> },
    /// The consumer of the stream went away; not a failure of the source.
    #[error("the pipeline stopped consuming the stream")]
    Stopped,
    #[error("protocol violation at {lsn}: {reason}")]
    Protocol { lsn: Lsn, reason: String },
    #[error("SQL connection to Postgres failed")]
    Sql(#[source] tokio_postgres::Error),
    #[error("spill file for streamed transaction {xid} failed")]
    Spill {
        xid: u32,
        #[source]
        source: io::Error,
    },
}

/// SQLSTATE classes and codes after which a new connection may succeed.
const TRANSIENT_SQLSTATES: &[&str] = &[
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "53300", // too_many_connections
    "40001", // serialization_failure
    "40P01", // deadlock_detected
];

impl Classify for Error {
    /// Transient when a new connection can succeed: network trouble and server restarts.
    /// Authentication, missing objects, protocol violations and local I/O are fatal. (A change
    /// the source cannot decode is a protocol violation: the stream cannot skip it.)
    fn kind(&self) -> ErrorKind {
        let transient = match self {
            Error::Connect { .. } | Error::ConnectionLost(_) => true,
            Error::Server { code, .. } => {
                code.starts_with("08") || TRANSIENT_SQLSTATES.contains(&code.as_str())
            }
            Error::Sql(e) => match e.code() {
                Some(state) => {
                    let code = state.code();
                    code.starts_with("08") || TRANSIENT_SQLSTATES.contains(&code)
                }
                None => e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<io::Error>()),
            },
            Error::Tls { .. }
            | Error::Auth { .. }
            | Error::Setup(_)
            | Error::SlotInUse { .. }
            | Error::Stopped
            | Error::Protocol { .. }
            | Error::Spill { .. } => false,
        };
        if transient {
            ErrorKind::Transient
        } else {
            ErrorKind::Fatal
        }
    }
}

impl Error {
    pub(crate) fn protocol(lsn: Lsn, reason: impl Into<String>) -> Self {
        Error::Protocol { lsn, reason: reason.into() }
    }

    /// The SQLSTATE when the server reported one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code),
            Error::Sql(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Sql(e)
    }
}

/// A result whose error is the connector's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Displays an error with its causes: `outer: cause: root cause`, for logs.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}
