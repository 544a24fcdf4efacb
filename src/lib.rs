//! sluice: change-data capture from Postgres logical replication to other stores.
//!
//! The daemon core: configuration, the pipeline that carries change events from the source to a
//! target and acknowledgements back, the targets without heavy SDKs, and helpers to run local
//! Postgres clusters for the quick-start, the benchmark and the tests.

pub mod backfill;
pub mod bench;
pub(crate) mod compare;
pub mod config;
pub mod dead_letters;
pub mod demo;
pub mod error;
pub(crate) mod faults;
pub mod fuzz;
pub mod ha;
pub mod http;
pub(crate) mod json;
pub mod localpg;
pub mod metrics;
pub mod migration;
pub mod monitor;
pub mod pipeline;
pub mod sources;
pub mod status;
pub mod targets;
pub(crate) mod translate;
pub mod validate;
pub mod verify;
