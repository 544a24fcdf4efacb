//! The Postgres target: rows of another database or schema through a mapping, applied in source
//! order with a transactional checkpoint.

pub(crate) mod apply;
pub(crate) mod catalog;
pub(crate) mod check;
pub mod config;
pub(crate) mod error;
pub(crate) mod mapping;
pub(crate) mod translate;
pub(crate) mod verify;
