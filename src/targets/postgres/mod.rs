//! The Postgres target: rows of another database or schema through a mapping, applied in source
//! order with a transactional checkpoint.

pub mod apply;
pub mod catalog;
pub mod check;
pub mod config;
pub mod error;
pub mod mapping;
pub mod translate;
pub mod verify;
