//! Faults the integration tests inject, read from environment variables only in builds with
//! the `test-hooks` feature; in other builds every function here is a no-op the compiler drops.
//!
//! - `SLUICE_TEST_PANIC_IN=<point>`: panics at `point` (`dynamodb-worker`, `postgres-applier`,
//!   `backfill`), to prove that a background task's panic fails the pipeline.
//! - `SLUICE_TEST_BACKFILL_WINDOW_DELAY_MS`: widens each backfill chunk's window.

use std::time::Duration;

/// Panics when the tests asked for a panic at `point`.
#[cfg(feature = "test-hooks")]
pub fn panic_at(point: &str) {
    if std::env::var("SLUICE_TEST_PANIC_IN").is_ok_and(|p| p == point) {
        panic!("injected panic at {point} (SLUICE_TEST_PANIC_IN)");
    }
}

/// See above; only in builds with the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn panic_at(_point: &str) {}

/// The widening of each backfill chunk's window (the time between the snapshot and the high
/// watermark), so that concurrent writes land inside it.
#[cfg(feature = "test-hooks")]
pub fn backfill_window_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("SLUICE_TEST_BACKFILL_WINDOW_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    })
}

/// See above; only in builds with the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn backfill_window_delay() -> Option<Duration> {
    None
}
