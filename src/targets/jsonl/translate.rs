//! Change events as JSON lines (the shape is in `json.rs` and the README).

use super::config::JsonlConfig;
use crate::translate::{Context, TranslateError, Translator};
use sluice_core::ChangeEvent;

/// Each change as one JSON line; begin and commit records too with `transactions`.
pub struct JsonlTranslator {
    transactions: bool,
}

impl JsonlTranslator {
    pub fn new(config: &JsonlConfig) -> Self {
        JsonlTranslator { transactions: config.transactions }
    }
}

impl Translator for JsonlTranslator {
    type Op = Vec<u8>;

    fn translate(
        &mut self,
        event: &ChangeEvent,
        _context: &Context,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), TranslateError> {
        let mut line = Vec::new();
        crate::json::write_event(&mut line, event, self.transactions);
        if !line.is_empty() {
            out.push(line);
        }
        Ok(())
    }
}
