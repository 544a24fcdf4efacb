//! The DynamoDB target: items through a mapping (or outbox events into an event log), written with
//! position guards.

pub(crate) mod apply;
mod attrs;
pub(crate) mod check;
pub mod config;
pub(crate) mod event_log;
pub(crate) mod inverse;
pub(crate) mod mapping;
pub(crate) mod translate;
pub(crate) mod verify;
