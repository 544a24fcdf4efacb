//! The Kafka target: plain CDC records per table and the outbox event router, through an
//! idempotent producer whose delivery reports drive acknowledgements.

pub(crate) mod apply;
pub(crate) mod check;
pub mod config;
pub(crate) mod format;
pub(crate) mod inverse;
pub(crate) mod translate;
