//! DynamoDB connector for sluice: SDK-free attribute values and position-guarded writes.

pub mod attr;
pub mod client;
pub mod error;
pub mod streams;

pub use attr::{item_size, Attr, Item, MAX_ITEM_BYTES};
pub use client::{
    ClientOptions, DynamoClient, GuardedWrite, KeySchema, Outcome, ScanCursor, TableStream, WriteAction,
};
pub use error::{DynamoError, ErrorKind};
