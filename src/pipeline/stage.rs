//! Translation inside the pipeline: each change of a batch through the target's translator,
//! the changes that can never be translated to the dead-letter store, the rest as one batch
//! of operations for the target.

use std::sync::Arc;

use crate::error::{ErrorKind, TargetError};
use crate::targets::dead_letter::source_name;
use crate::targets::{DeadLetter, OpBatch, Sourced};
use crate::translate::{Context, TranslateError, Translator};
use sluice_core::{ChangeEvent, EventBatch, Position, Relation};

/// The source name of each operation, shared by the operations of consecutive changes to one
/// table (the common case) instead of made again for each.
#[derive(Default)]
pub(super) struct SourceNames {
    last: Option<(Arc<Relation>, Arc<str>)>,
}

impl SourceNames {
    fn of(&mut self, event: &ChangeEvent) -> Arc<str> {
        let relation = match event {
            ChangeEvent::Insert { relation, .. }
            | ChangeEvent::Update { relation, .. }
            | ChangeEvent::Delete { relation, .. } => relation,
            other => return source_name(other).into(),
        };
        match &self.last {
            Some((last, name)) if Arc::ptr_eq(last, relation) => std::sync::Arc::<str>::clone(name),
            _ => {
                let name: Arc<str> = relation.qualified_name().into();
                self.last = Some((
                    std::sync::Arc::<sluice_core::Relation>::clone(relation),
                    std::sync::Arc::<str>::clone(&name),
                ));
                name
            }
        }
    }
}

/// The operations `batch` makes, skipping the changes at or before `applied_through`; the
/// changes the translator finds poison are dead-lettered (and counted) before this returns.
pub(super) async fn translate<X: Translator>(
    translator: &mut X,
    batch: &EventBatch,
    applied_through: Option<Position>,
    dead_letter: &DeadLetter,
    names: &mut SourceNames,
    target: &'static str,
) -> Result<OpBatch<X::Op>, TargetError> {
    let context = Context { now_unix_seconds: now_unix_seconds() };
    let mut ops = Vec::new();
    let mut out = Vec::new();
    let mut skipped = 0;
    for event in &batch.events {
        let position = event.position();
        if let (Some(position), Some(through)) = (position, applied_through) {
            if position <= through {
                skipped += u64::from(event.is_row_change());
                continue;
            }
        }
        match translator.translate(event, &context, &mut out) {
            Ok(()) => {}
            Err(error @ TranslateError::Poison { .. }) => {
                let position = position.unwrap_or_default();
                // The change itself (its key and row): what `dead-letter replay` re-drives.
                let change = |line: &mut Vec<u8>| {
                    line.extend_from_slice(b",\"change\":");
                    crate::json::write_event(line, event, false);
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                };
                dead_letter.record(position, &source_name(event), Some(&change), &error.to_string()).await?;
                out.clear();
                continue;
            }
            Err(error @ TranslateError::Fatal { .. }) => {
                return Err(TargetError {
                    target,
                    kind: ErrorKind::Fatal,
                    message: error.to_string(),
                    source: None,
                });
            }
        }
        if out.is_empty() {
            continue;
        }
        let (position, source) = (position.unwrap_or_default(), names.of(event));
        ops.extend(out.drain(..).map(|op| Sourced {
            op,
            position,
            source: std::sync::Arc::<str>::clone(&source),
        }));
    }
    if skipped > 0 {
        metrics::counter!(crate::metrics::REPLAY_SKIPPED_TOTAL).increment(skipped);
    }
    Ok(OpBatch {
        ops,
        events: batch.events.len(),
        redelivery_horizon: batch.redelivery_horizon,
        slice: batch.slice.clone(),
    })
}

fn now_unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
