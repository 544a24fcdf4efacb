//! Semantic translators: pure functions from change events to target operations, driven by
//! the declarative mappings in `schemas/`.

pub mod catalog;
pub mod dynamodb;
pub mod mapping;
pub mod kafka;
pub mod outbox;
pub mod postgres;
