//! The jsonl target: one JSON object per change, to a file or standard output.

pub(crate) mod apply;
pub mod config;
pub(crate) mod translate;
