//! Postgres connector for sluice: the logical replication client, the pgoutput decoder, the
//! COPY and binary value decoders, set-up checks, the replication and polling sources. The
//! change-event model and values they produce live in `sluice-core`.

mod binary;
pub mod catalog;
mod client;
pub mod config;
pub mod copy;
pub mod decode;
pub mod error;
pub mod fuzz;
pub mod pacing;
pub mod pgoutput;
pub mod poll;
pub mod session;
pub mod setup;
pub mod source;
pub mod spill;
mod tls;
pub mod types;

pub use client::{
    connect_sql, connect_sql_as, connect_sql_choosing, now_pg_micros, ReplicationClient,
    PG_EPOCH_OFFSET_MICROS,
};
pub use config::{
    ConnectionConfig, OriginFilter, ReplicationConfig, SessionAttrs, SlotLostPolicy, SslMode, Streaming,
};
pub use error::{Error, Result};
pub use poll::{AfterPublish, PollConfig, PollSource};
pub use session::ReadSession;
pub use source::{ReplicationSource, SourceOptions, SourceStats};
