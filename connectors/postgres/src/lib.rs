//! Postgres connector for sluice: the logical replication client, the pgoutput decoder, typed
//! values, and the change-event model every other part of sluice works with.

mod binary;
pub mod catalog;
mod client;
pub mod config;
pub mod decode;
pub mod duration;
pub mod error;
pub mod event;
pub mod lsn;
pub mod pgoutput;
pub mod poll;
pub mod setup;
pub mod source;
pub mod spill;
mod tls;
pub mod types;
pub mod value;

pub use client::{connect_sql, now_pg_micros, ReplicationClient, PG_EPOCH_OFFSET_MICROS};
pub use config::{ConnectionConfig, Problem, ReplicationConfig, Secret, SlotLostPolicy, SslMode};
pub use error::{Error, Result};
pub use event::{ChangeEvent, Column, EventBatch, NewRow, OldRow, Position, Relation, ReplicaIdentity};
pub use lsn::Lsn;
pub use poll::{AfterPublish, PollConfig, PollSource};
pub use source::{ReplicationSource, SourceOptions, SourceStats};
pub use value::{Date, Interval, Numeric, Time, Timestamp, Value};
