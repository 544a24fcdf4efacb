//! The daemon's background verify (`[verify] max_rows_per_second`): the same pass as `sluice
//! verify`, throttled, repeated every `interval` while this replica streams, so that the drift
//! between the two stores is a number on the dashboard over the whole migration, not only
//! when someone runs `verify`.
//!
//! A pass holds no snapshot across its chunks (each chunk is one short read: a slow pass never
//! holds back vacuum on the source); keys found wrong are checked again once the stream has
//! passed the pass's end, as in `sluice verify`, so rows changing under the pass are not drift.
//! A pass that fails (a lost connection, a target timing out) is logged and counted; the next
//! one starts after `interval`. Nothing here writes to either store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sluice_core::Shutdown;

use crate::config::Config;
use crate::metrics as m;
use crate::monitor::PipelineState;

use super::{verify_with, Report, Verifier, VerifyArgs};

/// What `/status` and `sluice status` show of the background verify.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifySummary {
    /// Passes finished (with or without differences).
    pub passes: u64,
    /// Passes that could not finish.
    pub failed_passes: u64,
    /// The newest finished pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pass: Option<PassSummary>,
    /// The newest finished pass over every row (`sample = 1`), which also looked for extra items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_full_pass: Option<PassSummary>,
    /// Why the newest pass failed, when it did (no row values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One finished pass.
#[derive(Clone, Debug, Serialize)]
pub struct PassSummary {
    /// When it finished, Unix seconds.
    pub finished_at: u64,
    /// How long it took.
    pub seconds: f64,
    /// The fraction of rows it read.
    pub sample: f64,
    /// Source rows checked.
    pub rows: u64,
    /// Keys still wrong after the re-check (missing, different, extra), per source table.
    pub differences: BTreeMap<String, u64>,
}

/// The running background verify; dropping it stops it (at its next await).
pub struct BackgroundVerify {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts the background verify on a thread of the runtime's blocking pool, off the workers
/// that carry the stream. (Its reads go through the same retrying session as `sluice verify`,
/// whose per-attempt closures the compiler cannot yet prove `Send` for a spawned task; on its
/// own thread the pass is never moved between threads, so it need not be.)
pub fn spawn(config: Config, state: Arc<PipelineState>, shutdown: Shutdown) -> BackgroundVerify {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async move {
            tokio::select! {
                () = run(config, state, shutdown) => {}
                _ = stopped => {}
            }
        })
    });
    BackgroundVerify { _stop: stop }
}

/// Runs passes until shutdown; never returns an error (a failed pass waits for the next).
async fn run(config: Config, state: Arc<PipelineState>, mut shutdown: Shutdown) {
    let settings = config.verify.clone();
    let args = VerifyArgs {
        config: std::path::PathBuf::new(),
        tables: Vec::new(),
        show: 10,
        values: false,
        json: false,
        chunk_size: settings.chunk_size,
        max_rows_per_second: settings.max_rows_per_second,
        sample: (settings.sample < 1.0).then_some(settings.sample),
        recheck_timeout: settings.recheck_timeout,
        force: false,
        background: true,
    };
    let interval = format!("{}s", settings.interval.as_secs());
    tracing::info!(
        max_rows_per_second = settings.max_rows_per_second,
        sample = settings.sample,
        interval = %interval,
        "background verify on"
    );
    let mut verifier: Option<Verifier> = None;
    loop {
        let pass = async {
            if verifier.is_none() {
                verifier = Some(Verifier::open(&config).await?);
            }
            let outcome = verify_with(verifier.as_ref().expect("opened above"), &args).await;
            if outcome.is_err() {
                // Opened afresh for the next pass: a session may be what failed.
                verifier = None;
            }
            outcome
        };
        let outcome = tokio::select! {
            outcome = pass => outcome,
            _ = shutdown.requested() => return,
        };
        match outcome {
            Ok(report) => record(&state, &report, settings.sample),
            Err(error) => {
                metrics::counter!(m::VERIFY_PASSES_TOTAL, "outcome" => "failed").increment(1);
                tracing::warn!(
                    error = %error,
                    next_pass_in = %interval,
                    "background verify pass did not finish; the drift metrics keep the last finished pass"
                );
                state.update_verify(|summary| {
                    summary.failed_passes += 1;
                    summary.last_error = Some(error.to_string());
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.requested() => return,
        }
    }
}

/// Publishes a finished pass: the gauges, the counters and the status summary.
fn record(state: &PipelineState, report: &Report, sample: f64) {
    let full = sample >= 1.0;
    let differences: BTreeMap<String, u64> =
        report.tables.iter().map(|t| (t.table.clone(), t.missing + t.different + t.extra)).collect();
    let finished_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for (table, wrong) in &differences {
        metrics::gauge!(m::VERIFY_MISMATCHES, "table" => table.clone()).set(*wrong as f64);
        if full {
            metrics::gauge!(m::VERIFY_LAST_FULL_MISMATCHES, "table" => table.clone()).set(*wrong as f64);
            metrics::gauge!(m::VERIFY_LAST_FULL_TIMESTAMP, "table" => table.clone()).set(finished_at as f64);
        }
    }
    let total: u64 = differences.values().sum();
    metrics::counter!(m::VERIFY_PASSES_TOTAL, "outcome" => if total == 0 { "clean" } else { "drift" })
        .increment(1);
    if total > 0 {
        let tables: Vec<String> =
            differences.iter().filter(|(_, n)| **n > 0).map(|(t, n)| format!("{t}: {n}")).collect();
        tracing::warn!(
            differences = total,
            tables = %tables.join(", "),
            "background verify found keys that differ after the re-check; `sluice verify --table …` names them, `sluice reconcile` repairs them"
        );
    }
    let pass = PassSummary {
        finished_at,
        seconds: report.seconds,
        sample,
        rows: report.tables.iter().map(|t| t.rows).sum(),
        differences,
    };
    state.update_verify(|summary| {
        summary.passes += 1;
        summary.last_error = None;
        if full {
            summary.last_full_pass = Some(pass.clone());
        }
        summary.last_pass = Some(pass);
    });
}
