//! The Postgres target's errors: what kind each server error is, and how it is named without
//! quoting row values.

use std::fmt::Write as _;

use crate::error::{ErrorKind, TargetError};

pub(crate) const TARGET: &str = "postgres";

pub(crate) fn fatal(message: impl Into<String>) -> TargetError {
    TargetError { target: TARGET, kind: ErrorKind::Fatal, message: message.into(), source: None }
}

pub(crate) fn sql_error(context: &str, error: tokio_postgres::Error) -> TargetError {
    let (kind, message) = (classify(&error), format!("{context}: {}", describe(&error)));
    // A server error is not kept as the source: its text (printed with the error chain) may
    // quote row values; `describe` kept what is safe to print.
    let source: Option<Box<dyn std::error::Error + Send + Sync>> =
        if error.as_db_error().is_some() { None } else { Some(Box::new(error)) };
    TargetError { target: TARGET, kind, message, source }
}

/// What went wrong, fit for logs: the server's SQLSTATE, with its message for the classes
/// whose messages name only objects and conditions (connection, transaction rollback,
/// resources, locks, operator intervention, names and permissions, login, unsupported
/// features). Other messages may quote values (invalid input, constraint details, a trigger's
/// RAISE): those errors are named by SQLSTATE, table, column and constraint only.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    const SAFE_CLASSES: [&str; 10] = ["08", "40", "53", "55", "57", "42", "3D", "3F", "28", "0A"];
    match error.as_db_error() {
        Some(db) if SAFE_CLASSES.iter().any(|class| db.code().code().starts_with(class)) => {
            format!("SQLSTATE {}: {}", db.code().code(), db.message())
        }
        Some(_) => error_fields(error),
        None => error.to_string(),
    }
}

/// Transient: the connection, a deadlock, a serialization failure, resources, a shutdown.
/// Poison: this row (data exceptions and integrity violations). Fatal: anything else.
pub(crate) fn classify(error: &tokio_postgres::Error) -> ErrorKind {
    match error.code().map(|c| c.code()) {
        None => ErrorKind::Transient,
        Some(code) if code.starts_with("22") || code.starts_with("23") => ErrorKind::Poison,
        Some(code)
            if ["08", "40", "53", "57P"].iter().any(|class| code.starts_with(class)) || code == "55P03" =>
        {
            ErrorKind::Transient
        }
        Some(_) => ErrorKind::Fatal,
    }
}

/// Why the target refused a row, without the server's message (it quotes values).
pub(crate) fn refusal(error: &tokio_postgres::Error) -> String {
    format!("the target refused the change: {}", error_fields(error))
}

/// A server error by its SQLSTATE and the objects it names (table, column, constraint, type).
pub(crate) fn error_fields(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else { return error.to_string() };
    let mut fields = format!("SQLSTATE {}", db.code().code());
    for (label, value) in [
        ("table", db.table()),
        ("column", db.column()),
        ("constraint", db.constraint()),
        ("type", db.datatype()),
    ] {
        if let Some(value) = value {
            let _ = write!(fields, ", {label} {value}");
        }
    }
    fields
}
