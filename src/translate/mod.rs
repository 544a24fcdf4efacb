//! What the targets' translators share: the translation error, a value's text, the mapping
//! vocabulary every format uses (`mapping`), row filters (`filter`) and the outbox event router
//! (`outbox`), which both Kafka and DynamoDB targets route through. Each target's own
//! translator lives in `targets/<name>/translate.rs`.

pub mod filter;
pub mod mapping;
pub mod outbox;

use sluice_core::{ChangeEvent, Timestamp, Value};

/// What a translator may know besides the change: read once per batch by the pipeline, so
/// that translators stay pure.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context {
    /// The wall clock, seconds since 1970 (for time-to-live attributes of tombstones).
    pub now_unix_seconds: u64,
}

/// A target's translator: change events to the target's operations. Pure and synchronous: no
/// I/O, the same event gives the same operations (verify relies on it to compute what the
/// target must hold).
///
/// The pipeline calls it for every change of a batch in source order (Relation events too:
/// a translator ignores what it does not map). A `Poison` error means this change can never
/// apply as mapped: the pipeline dead-letters it and goes on; `Fatal` stops the pipeline with
/// nothing confirmed past the last durable batch.
pub trait Translator: Send {
    /// What the target applies.
    type Op: Send + 'static;

    /// Appends the operations `event` makes to `out` (none when it maps to nothing).
    fn translate(
        &mut self,
        event: &ChangeEvent,
        context: &Context,
        out: &mut Vec<Self::Op>,
    ) -> Result<(), TranslateError>;
}

/// A change that cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// This row can never be written as mapped: dead-letter it and go on.
    #[error("table {table}{}: {reason}", column.as_deref().map(|c| format!(" column {c}")).unwrap_or_default())]
    Poison { table: String, column: Option<String>, reason: String },
    /// The stream cannot go on as configured.
    #[error("table {table}: {reason}")]
    Fatal { table: String, reason: String },
}

/// A value's text for keys, filters and `as = "string"`: ISO 8601 for dates and timestamps,
/// Postgres' text otherwise.
pub(crate) fn text_of(value: &Value) -> String {
    match value {
        Value::Text(s) | Value::Enum(s) | Value::Json(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Timestamp(ts) => iso(*ts, false),
        Value::TimestampTz(ts) => iso(*ts, true),
        Value::Date(date) => match date.ymd() {
            Some((y, m, d)) if y >= 0 => format!("{y:04}-{m:02}-{d:02}"),
            Some((y, m, d)) => format!("-{:04}-{m:02}-{d:02}", -y),
            None => date.to_string(),
        },
        other => other.to_string(),
    }
}

pub(crate) fn iso(ts: Timestamp, with_zone: bool) -> String {
    let mut text = String::new();
    let _ = ts.write_iso(&mut text, with_zone);
    text
}
