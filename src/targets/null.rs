//! The null target: every batch is durable at once. For benchmarks of the source side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::TargetError;
use crate::targets::{OpBatch, Receipt, Target};
use crate::translate::{Context, TranslateError, Translator};
use sluice_core::ChangeEvent;

/// Counts the changes it is given and discards them.
#[derive(Debug, Default)]
pub struct NullTarget {
    /// Events received.
    pub events: Arc<AtomicU64>,
}

/// Translates every change to nothing.
#[derive(Debug, Default)]
pub struct NullTranslator;

impl Translator for NullTranslator {
    type Op = ();

    fn translate(&mut self, _: &ChangeEvent, _: &Context, _: &mut Vec<()>) -> Result<(), TranslateError> {
        Ok(())
    }
}

impl Target for NullTarget {
    type Op = ();

    async fn submit(&mut self, batch: OpBatch<()>) -> Result<Receipt, TargetError> {
        self.events.fetch_add(batch.events as u64, Ordering::Relaxed);
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
}
