//! Integration tests against real services started by the harness (see `harness.rs`).

mod harness;
mod types;
mod identity;
mod crash;
mod errors;
mod auth;
mod streaming;
mod reconnect;
mod slots;
mod dynamodb;
mod operations;
mod helm;
mod kafka;
mod poll;
mod backfill;
mod pg_target;
mod demo;
