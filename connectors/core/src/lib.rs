//! What every part of sluice shares, and nothing that talks to a server: the change-event model
//! (`event`), typed values (`value`), source positions (`Lsn`, `Position`), configuration
//! problems and secrets, durations in configuration files, the shutdown signal, the error kind
//! that decides what happens after a failure (`error`), and the one retry policy (`retry`).
//!
//! Sources produce [`event::ChangeEvent`]s, translators turn them into a target's operations,
//! targets apply those; all of them name events, values and positions through this crate, so no
//! connector depends on another to speak of a change.

pub mod duration;
pub mod error;
pub mod event;
pub mod lsn;
pub mod problem;
pub mod retry;
pub mod secret;
pub mod shutdown;
pub mod table;
pub mod types;
pub mod value;

pub use error::{action, Action, Classify, ErrorKind};
pub use event::{
    ChangeEvent, Column, EventBatch, LogSlice, NewRow, OldRow, Position, Relation, ReplicaIdentity,
};
pub use lsn::Lsn;
pub use problem::Problem;
pub use retry::{Backoff, GaveUp, RetryPolicy};
pub use secret::Secret;
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use table::TableName;
pub use types::TypeKind;
pub use value::{Date, Interval, Numeric, Time, Timestamp, Value};
