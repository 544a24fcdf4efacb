//! The jsonl target: one JSON object per change, to a file or standard output.

pub mod apply;
pub mod config;
pub mod translate;
