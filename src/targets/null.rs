//! The null target: every batch is durable at once. For benchmarks of the source side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Receipt, Target};
use crate::error::TargetError;
use sluice_core::EventBatch;

#[derive(Debug, Default)]
pub struct NullTarget {
    pub events: Arc<AtomicU64>,
}

impl Target for NullTarget {
    async fn submit(&mut self, batch: Arc<EventBatch>) -> Result<Receipt, TargetError> {
        self.events.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
}
