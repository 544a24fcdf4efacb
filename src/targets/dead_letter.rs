//! The dead-letter store: one JSON line per change that can never apply, with the reason and
//! the source position, appended and synced before the change counts as handled. Without a
//! file the entry is only logged, without values. Every entry is counted in the target's
//! `dead_lettered` statistic.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::TargetStats;
use crate::error::TargetError;
use sluice_core::{ChangeEvent, Position};

/// Where changes that can never apply go: a JSON-lines file, counted.
pub struct DeadLetter {
    target: &'static str,
    file: Option<tokio::sync::Mutex<tokio::fs::File>>,
    path: Option<PathBuf>,
    stats: Arc<TargetStats>,
}

/// The table(s) an event belongs to, or `message:<prefix>`, for dead-letter entries.
pub fn source_name(event: &ChangeEvent) -> String {
    match event {
        ChangeEvent::Insert { relation, .. }
        | ChangeEvent::Update { relation, .. }
        | ChangeEvent::Delete { relation, .. } => relation.qualified_name(),
        ChangeEvent::Truncate { relations, .. } => {
            relations.iter().map(|r| r.qualified_name()).collect::<Vec<_>>().join(",")
        }
        ChangeEvent::Message { prefix, .. } => format!("message:{prefix}"),
        _ => String::new(),
    }
}

/// Writes a target's own fields into an entry (each starting with a comma).
pub type Details<'a> = &'a (dyn Fn(&mut Vec<u8>) + Sync);

impl DeadLetter {
    /// Opens (creating) `path` for `target`; without a path, dead-lettered changes are only
    /// counted and logged.
    pub async fn open(
        target: &'static str,
        path: Option<PathBuf>,
        stats: Arc<TargetStats>,
    ) -> Result<Self, TargetError> {
        let file = match &path {
            Some(path) => Some(tokio::sync::Mutex::new(
                tokio::fs::OpenOptions::new().create(true).append(true).open(path).await.map_err(|e| {
                    TargetError::fatal(
                        target,
                        format!("cannot open dead-letter file {} (target.dead_letter)", path.display()),
                        e,
                    )
                })?,
            )),
            None => None,
        };
        Ok(DeadLetter { target, file, path, stats })
    }

    /// Appends and syncs an entry, and counts it.
    pub async fn record(
        &self,
        position: Position,
        source_table: &str,
        details: Option<Details<'_>>,
        reason: &str,
    ) -> Result<(), TargetError> {
        tracing::warn!(table = source_table, commit_lsn = %position.commit_lsn, ordinal = position.tx_ordinal, reason, "dead-lettered a change");
        let Some(file) = &self.file else {
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let mut line = Vec::new();
        line.extend_from_slice(
            format!(
                "{{\"commit_lsn\":\"{}\",\"ordinal\":{},\"table\":",
                position.commit_lsn, position.tx_ordinal
            )
            .as_bytes(),
        );
        crate::json::string(&mut line, source_table);
        line.extend_from_slice(b",\"reason\":");
        crate::json::string(&mut line, reason);
        if let Some(details) = details {
            details(&mut line);
        }
        line.extend_from_slice(b"}\n");
        let mut file = file.lock().await;
        let io = |e: std::io::Error| {
            let path = self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            TargetError::fatal(self.target, format!("cannot write dead-letter file {path}"), e)
        };
        file.write_all(&line).await.map_err(io)?;
        file.sync_data().await.map_err(io)?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
