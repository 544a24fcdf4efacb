//! Faults the integration tests inject, read from environment variables only in builds with
//! the `test-hooks` feature; in other builds every function here is a no-op the compiler drops.
//!
//! - `SLUICE_TEST_PANIC_IN=<point>`: panics at `point` (`dynamodb-worker`, `postgres-applier`,
//!   `backfill`), to prove that a background task's panic fails the pipeline.
//! - `SLUICE_TEST_BACKFILL_WINDOW_DELAY_MS`: widens each backfill chunk's window.
//! - `SLUICE_TEST_KILL_AT=<point>`: kills the process (SIGKILL) at a step of a command.
//! - `SLUICE_TEST_CONFIRM_EARLY=1`: a planted bug, to show that the fault soak catches it: each
//!   batch is confirmed to the source as soon as it is submitted, before the target made it
//!   durable.

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

/// Kills the process with SIGKILL (as `kill -9` does: no cleanup, no unwinding) when the
/// tests asked for it at `point` (`SLUICE_TEST_KILL_AT=<point>`): the steps of `cutover` and
/// `rollback` (`cutover-1` … `cutover-4`, `rollback-1` … `rollback-4`).
#[cfg(feature = "test-hooks")]
pub fn kill_at(point: &str) {
    if std::env::var("SLUICE_TEST_KILL_AT").is_ok_and(|p| p == point) {
        eprintln!("injected kill -9 at {point} (SLUICE_TEST_KILL_AT)");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::process::abort();
    }
}

/// See above; only in builds with the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn kill_at(_point: &str) {}

/// The planted bug of `SLUICE_TEST_CONFIRM_EARLY` (see above).
#[cfg(feature = "test-hooks")]
pub fn confirm_early() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SLUICE_TEST_CONFIRM_EARLY").is_ok_and(|v| v == "1"))
}

/// See above; only in builds with the `test-hooks` feature.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn confirm_early() -> bool {
    false
}
