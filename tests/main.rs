//! Integration tests against real services started by the harness (see `harness.rs`).

mod auth;
mod backfill;
mod checks;
mod crash;
mod cutover;
mod demo;
mod dynamodb;
mod dynamodb_back;
mod dynamodb_streams;
mod errors;
mod fuzz;
mod harness;
mod helm;
mod identity;
mod kafka;
mod migration;
mod operations;
mod pg_target;
mod poll;
mod reconnect;
mod replicas;
mod slots;
mod soak;
mod streaming;
mod types;
mod versions;
