//! The change-event model. It is defined beside the Postgres decoder that produces it
//! (`sluice_postgres::event`) so that connector crates can share it without depending on the
//! daemon; this module is its home for the rest of sluice.

pub use sluice_postgres::event::*;
pub use sluice_postgres::value::*;
pub use sluice_postgres::Lsn;
