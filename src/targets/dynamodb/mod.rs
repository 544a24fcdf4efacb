//! The DynamoDB target: items through a mapping (or outbox events into an event log), written with
//! position guards.

pub mod apply;
pub mod check;
pub mod config;
pub mod event_log;
pub mod mapping;
pub mod translate;
pub mod verify;
