//! One pipeline: the source task streams batches over a bounded channel; this task submits them
//! to the target, tracks their receipts, and publishes the durable source position back to the
//! source, which confirms it upstream.
//!
//! ```text
//! ReplicationSource ──EventBatch──▶ apply loop ──submit──▶ Target
//!        ▲                              │ receipts (any order)
//!        └──── durable Lsn (watch) ◀── AckTracker (unbroken prefix only)
//! ```

pub(crate) mod ack;
mod checkpoint;
mod stage;

use sluice_core::Shutdown;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use sluice_core::{EventBatch, Lsn, Position};
use sluice_postgres::{PollSource, ReplicationSource, SourceOptions, SourceStats};
use tokio::sync::{mpsc, watch};

use crate::backfill::window::{Part, Watermarks};
use crate::config::{Config, SourceMode};
use crate::error::{PipelineError, TargetError};
use crate::monitor::PipelineState;
use crate::targets::{DeadLetter, Opened, Target};
use crate::translate::Translator;
use ack::AckTracker;
use sluice_core::ChangeEvent;
use stage::SourceNames;

/// Batches buffered between source and target: with `batch_max_events` this bounds memory.
const CHANNEL_BATCHES: usize = 4;

/// A running pipeline's handles for status and tests.
pub struct Pipeline {
    /// The source's counters.
    pub source_stats: Arc<SourceStats>,
    /// The position through which changes are durable in the target.
    pub durable: watch::Receiver<Lsn>,
}

/// Runs the pipeline until `shutdown` turns true (a graceful drain) or a fatal error.
/// `on_start` receives the handles once the tasks exist; `state` is kept current for the
/// monitoring endpoints.
pub async fn run(
    config: &Config,
    state: &Arc<PipelineState>,
    shutdown: Shutdown,
    on_start: impl FnOnce(Pipeline),
) -> Result<(), PipelineError> {
    let dead_letter = Arc::new(
        DeadLetter::open(
            config.target.kind(),
            config.target.dead_letter().map(Into::into),
            Arc::clone(&state.target),
        )
        .await?,
    );
    // Origins are named after the forward slot; each direction writes with its own and drops
    // the other's.
    use crate::migration::{fence::origin_name, Direction};
    let (origins_of, writes, drops) = match &config.reverse_of {
        None => (config.source.lock_name(), Direction::Forward, Direction::Reverse),
        Some(of) => (of.slot.clone(), Direction::Reverse, Direction::Forward),
    };
    // Appliers in a consumer group write at once from several processes; an origin is held by
    // one session at a time, so theirs carry none.
    let origin = if config.source.is_database() { origin_name(&origins_of, writes) } else { String::new() };
    let target = Opened::open(
        &config.target,
        &config.pipeline.name,
        &origin,
        Arc::clone(&state.target),
        Arc::clone(&dead_letter),
    )
    .await?;
    // Progress inside a transaction, for the targets that keep no checkpoint of their own.
    let checkpoint = match (&config.source.mode, &config.target) {
        (
            SourceMode::Replication(replication),
            crate::targets::TargetConfig::Dynamodb(_)
            | crate::targets::TargetConfig::Kafka(_)
            | crate::targets::TargetConfig::Jsonl(_),
        ) if !config.pipeline.checkpoint_interval.is_zero() => Some(checkpoint::Checkpoint::new(
            config.source.heartbeat_connection.clone().unwrap_or_else(|| config.source.connection.clone()),
            config.pipeline.checkpoint_table.clone(),
            &config.pipeline.name,
            &replication.slot,
        )),
        _ => None,
    };
    let resume = match &checkpoint {
        Some(checkpoint) => checkpoint.load().await,
        None => None,
    };
    if let Some(position) = resume {
        tracing::info!(
            commit_lsn = %position.commit_lsn,
            ordinal = position.tx_ordinal,
            "a replayed transaction's changes through this position are durable in the target: skipped"
        );
    }
    let (progress, progress_rx) = watch::channel(None);
    let _checkpoint = checkpoint.map(|checkpoint| {
        AbortOnDrop(tokio::spawn(checkpoint.keep(progress_rx, config.pipeline.checkpoint_interval)))
    });
    let gate = match &config.reverse_of {
        Some(_) => Some(
            crate::migration::reverse::PhaseGate::open(
                config,
                sluice_core::RetryPolicy::new(config.pipeline.retry_for),
            )
            .await
            .map_err(|message| TargetError {
                target: config.target.kind(),
                kind: crate::error::ErrorKind::Fatal,
                message,
                source: None,
            })?,
        ),
        None => None,
    };
    let options = SourceOptions {
        batch_max_events: config.pipeline.batch_max_events,
        retry_for: config.pipeline.retry_for,
        shutdown_timeout: config.pipeline.shutdown_timeout,
        // sluice's own writes into the source (the other direction's): never sent on.
        drop_origins: vec![origin_name(&origins_of, drops)],
        heartbeat_connection: config.source.heartbeat_connection.clone(),
        ..SourceOptions::default()
    };
    let (batch_tx, batch_rx) = mpsc::channel(CHANNEL_BATCHES);
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
    let mut shutdown_started = shutdown.clone();
    let connection = config.source.connection.clone();
    let mut watermarks = config
        .own_tables()
        .into_iter()
        .fold(Watermarks::new(&config.pipeline.name, None), Watermarks::ignoring);
    let mut backfill_task = None;
    let (stats, source_task) = match &config.source.mode {
        SourceMode::Replication(replication) => {
            let source = ReplicationSource::new(connection.clone(), replication.clone(), options);
            if config.backfill.enabled {
                // The backfill serves requests beside the stream; its chunks merge at watermarks.
                // Each request keeps at most two chunks unmerged (one read ahead): the channel
                // bounds what the backfill holds in memory to that.
                let (chunk_tx, chunk_rx) = mpsc::channel(
                    2 * config.backfill.concurrency.max(1) * config.backfill.readers_per_table(),
                );
                watermarks = config
                    .own_tables()
                    .into_iter()
                    .fold(Watermarks::new(&config.pipeline.name, Some(chunk_rx)), Watermarks::ignoring)
                    .with_part_max_events(config.pipeline.batch_max_events);
                backfill_task = Some(tokio::spawn(crate::backfill::run(
                    connection,
                    crate::backfill::Scope {
                        pipeline: config.pipeline.name.clone(),
                        slot: replication.slot.clone(),
                        publication: replication.publication.clone(),
                    },
                    config.backfill.clone(),
                    chunk_tx,
                    source.stats(),
                    shutdown.clone(),
                )));
            }
            let stats = source.stats();
            let task = source.run(batch_tx, durable_rx.clone(), shutdown);
            (stats, tokio::spawn(async move { task.await.map_err(PipelineError::from) }))
        }
        SourceMode::Poll(poll) => {
            let source = PollSource::new(connection, poll.clone(), options);
            let stats = source.stats();
            let task = source.run(batch_tx, durable_rx.clone(), shutdown);
            (stats, tokio::spawn(async move { task.await.map_err(PipelineError::from) }))
        }
        SourceMode::Kafka(kafka) => {
            let source = crate::sources::kafka::KafkaSource::new(
                kafka.clone(),
                config.pipeline.batch_max_events,
                config.pipeline.shutdown_timeout,
                config.target.unconditional_writes(),
                Arc::clone(&dead_letter),
            );
            (source.stats(), tokio::spawn(source.run(batch_tx, durable_rx.clone(), shutdown)))
        }
    };
    state.set_source(Arc::clone(&stats));
    // The background verify reads both stores while this replica streams; it ends with the
    // pipeline (dropping its handle stops it), and never fails it.
    let _verify = (config.verify.enabled()
        && config.source.replication().is_some()
        && matches!(
            config.target,
            crate::targets::TargetConfig::Dynamodb(_) | crate::targets::TargetConfig::Postgres(_)
        ))
    .then(|| crate::verify::background::spawn(config.clone(), Arc::clone(state), shutdown_started.clone()));
    on_start(Pipeline { source_stats: stats, durable: durable_rx });
    // On shutdown the source waits `shutdown_timeout` for in-flight batches, confirms what is
    // durable and stops; a target still retrying after that is abandoned (its batches were not
    // confirmed and will be streamed again).
    let grace = config.pipeline.shutdown_timeout + std::time::Duration::from_secs(5);
    let stage = Stage {
        target: config.target.kind(),
        dead_letter: &dead_letter,
        max_in_flight: config.pipeline.max_in_flight,
        state,
        gate,
        resume,
        progress,
    };
    let applied = tokio::select! {
        applied = apply_opened(target, stage, batch_rx, durable_tx, &mut watermarks) => applied.map_err(PipelineError::from),
        // The backfill is never fatal by its failures (it retries them), but a panic in it is a
        // defect: stop rather than stream on with requests that will never finish.
        panicked = panicked(&mut backfill_task) => Err(PipelineError::Task(format!("the backfill task panicked ({panicked})"))),
        _ = async {
            shutdown_started.requested().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown timeout: abandoning target writes still in flight; they will be streamed again");
            Ok(())
        }
    };
    // A failed target drops the channel, which stops the source without confirming more.
    let sourced = source_task.await.map_err(|e| PipelineError::Task(e.to_string()))?;
    applied?;
    sourced
}

/// Resolves with the panic's message if the task panics; never otherwise (also not when it
/// ends normally, at shutdown or once the pipeline stops taking chunks).
async fn panicked(task: &mut Option<tokio::task::JoinHandle<()>>) -> String {
    if let Some(handle) = task {
        if let Err(error) = handle.await {
            *task = None;
            if error.is_panic() {
                let panic = error.into_panic();
                return panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
            }
        }
        *task = None;
    }
    std::future::pending().await
}

/// Runs [`apply`] with the target and translator that were opened.
async fn apply_opened(
    opened: Opened,
    stage: Stage<'_>,
    batches: mpsc::Receiver<EventBatch>,
    durable: watch::Sender<Lsn>,
    watermarks: &mut Watermarks,
) -> Result<(), TargetError> {
    match opened {
        Opened::Dynamodb(x, t) => Box::pin(apply(x, t, stage, batches, durable, watermarks)).await,
        Opened::Kafka(x, t) => Box::pin(apply(x, t, stage, batches, durable, watermarks)).await,
        Opened::Postgres(x, t) => Box::pin(apply(x, t, stage, batches, durable, watermarks)).await,
        Opened::Jsonl(x, t) => Box::pin(apply(x, t, stage, batches, durable, watermarks)).await,
        Opened::Null(x, t) => Box::pin(apply(x, t, stage, batches, durable, watermarks)).await,
    }
}

/// What the apply loop shares with the rest of the pipeline.
struct Stage<'a> {
    /// The target's name, for errors.
    target: &'static str,
    dead_letter: &'a DeadLetter,
    max_in_flight: usize,
    state: &'a PipelineState,
    /// The way back: only tables that stream back in their phase.
    gate: Option<crate::migration::reverse::PhaseGate>,
    /// Changes at or before this position are durable in the target (its checkpoint row).
    resume: Option<Position>,
    /// Receives the durable position while it lies inside a transaction.
    progress: watch::Sender<Option<Position>>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Submits batches in order, keeps at most `max_in_flight` unconfirmed, and publishes the
/// durable position. Returns when the source closes the channel and everything submitted is
/// durable, or at the first target failure (nothing past the durable prefix is published).
async fn apply<X: Translator, T: Target<Op = X::Op>>(
    mut translator: X,
    mut target: T,
    stage: Stage<'_>,
    mut batches: mpsc::Receiver<EventBatch>,
    durable: watch::Sender<Lsn>,
    watermarks: &mut Watermarks,
) -> Result<(), TargetError> {
    let Stage { target: target_name, dead_letter, max_in_flight, state, mut gate, resume, progress } = stage;
    let mut names = SourceNames::default();
    let mut tracker = AckTracker::default();
    let mut in_flight = FuturesUnordered::new();
    let mut source_open = true;
    while source_open || !in_flight.is_empty() {
        tokio::select! {
            Some((seq, result, chunk_done, chunk_applied)) = in_flight.next(), if !in_flight.is_empty() => {
                let result: Result<(), TargetError> = result;
                result?;
                if let Some((applied, n)) = chunk_applied {
                    let applied: Arc<std::sync::atomic::AtomicU64> = applied;
                    applied.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(done) = chunk_done {
                    let _ = tokio::sync::oneshot::Sender::<()>::send(done, ());
                }
                let advanced = tracker.complete(seq);
                // Commit at the source → durable in the target, per released batch.
                let now = sluice_postgres::now_pg_micros();
                for committed in tracker.take_released() {
                    metrics::histogram!(crate::metrics::APPLY_LATENCY_SECONDS)
                        .record(now.saturating_sub(committed).max(0) as f64 / 1e6);
                }
                if let Some(lsn) = advanced {
                    durable.send_replace(lsn);
                    state.set_durable(lsn, tracker.durable_commit_time());
                }
                if let Some(inside) = tracker.inside_transaction() {
                    progress.send_if_modified(|last| last.replace(inside) != Some(inside));
                }
            }
            batch = batches.recv(), if source_open && in_flight.len() < max_in_flight => match batch {
                Some(batch) => {
                    for Part { mut batch, chunk_done, chunk_applied } in watermarks.split(batch) {
                        if let Some(gate) = &mut gate {
                            gate.retain(&mut batch).await.map_err(|message| TargetError {
                                target: target_name,
                                kind: crate::error::ErrorKind::Fatal,
                                message,
                                source: None,
                            })?;
                        }
                        state.count_changes(count_events(&batch.events));
                        let last = batch.events.iter().rev().find_map(ChangeEvent::position);
                        let seq = tracker.register_batch(batch.ack_lsn, batch.commit_time, last);
                        if let Some(ack) = batch.ack_lsn.filter(|_| crate::faults::confirm_early()) {
                            durable.send_replace(ack);
                        }
                        // A partition's positions say nothing of the others': a target that
                        // checkpoints keeps one per partition (`EventBatch::slice`).
                        let skip_through = match batch.slice {
                            Some(_) => None,
                            None => target.applied_through().max(resume),
                        };
                        let ops = stage::translate(
                            &mut translator,
                            &batch,
                            skip_through,
                            dead_letter,
                            &mut names,
                            target_name,
                        )
                        .await?;
                        let receipt = target.submit(ops).await?;
                        let chunk_done: Option<tokio::sync::oneshot::Sender<()>> = chunk_done;
                        in_flight.push(async move { (seq, receipt.await, chunk_done, chunk_applied) });
                    }
                }
                None => source_open = false,
            },
        }
    }
    Ok(())
}

/// Counts a batch's changes by table and operation (aggregated first: one counter update per
/// table and operation, not per event); returns how many it counted.
fn count_events(events: &[ChangeEvent]) -> u64 {
    let mut counts: Vec<(&str, &str, &'static str, u64)> = Vec::new();
    for event in events {
        let (relation, op) = match event {
            ChangeEvent::Insert { relation, snapshot, .. } => {
                (relation, if *snapshot { "read" } else { "insert" })
            }
            ChangeEvent::Update { relation, .. } => (relation, "update"),
            ChangeEvent::Delete { relation, .. } => (relation, "delete"),
            ChangeEvent::Truncate { relations, .. } => match relations.first() {
                Some(relation) => (relation, "truncate"),
                None => continue,
            },
            _ => continue,
        };
        // Runs of one table's changes are the common case: compare with the last entry first.
        if let Some(last) = counts.last_mut().filter(|c| {
            c.2 == op
                && std::ptr::eq(c.0, relation.namespace.as_str())
                && std::ptr::eq(c.1, relation.name.as_str())
        }) {
            last.3 += 1;
            continue;
        }
        match counts.iter_mut().find(|c| c.0 == relation.namespace && c.1 == relation.name && c.2 == op) {
            Some(count) => count.3 += 1,
            None => counts.push((&relation.namespace, &relation.name, op, 1)),
        }
    }
    let mut total = 0;
    for (namespace, name, op, n) in counts {
        metrics::counter!(crate::metrics::EVENTS_TOTAL, "table" => format!("{namespace}.{name}"), "op" => op)
            .increment(n);
        total += n;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::targets::Receipt;
    use std::time::Duration;

    /// A target whose receipts resolve out of submission order (odd batches first), and which
    /// fails on a chosen batch.
    struct ReorderingTarget {
        submitted: u64,
        fail_at: Option<u64>,
    }

    impl Target for ReorderingTarget {
        type Op = ();

        async fn submit(&mut self, _batch: crate::targets::OpBatch<()>) -> Result<Receipt, TargetError> {
            let n = self.submitted;
            self.submitted += 1;
            let fail = self.fail_at == Some(n);
            let delay = [20, 1, 60, 1][(n % 4) as usize];
            Ok(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if fail {
                    Err(TargetError {
                        target: "test",
                        kind: ErrorKind::Fatal,
                        message: "injected".into(),
                        source: None,
                    })
                } else {
                    Ok(())
                }
            }))
        }
    }

    async fn dead_letter() -> DeadLetter {
        DeadLetter::open("test", None, Arc::default()).await.unwrap()
    }

    fn test_state() -> PipelineState {
        PipelineState::with("test", Duration::from_secs(60), false)
    }

    fn batch(ack: u64) -> EventBatch {
        EventBatch {
            events: Vec::new(),
            ack_lsn: Some(Lsn(ack)),
            redelivery_horizon: None,
            commit_time: None,
            slice: None,
        }
    }

    /// Applies four batches (acks 10 to 40) through the reordering target; the outcome and
    /// the durable position it left.
    async fn apply_four(fail_at: Option<u64>) -> (Result<(), TargetError>, Lsn) {
        let (tx, rx) = mpsc::channel(8);
        let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
        for ack in [10, 20, 30, 40] {
            tx.send(batch(ack)).await.unwrap();
        }
        drop(tx);
        let result = apply(
            crate::targets::NullTranslator,
            ReorderingTarget { submitted: 0, fail_at },
            Stage {
                target: "test",
                dead_letter: &dead_letter().await,
                max_in_flight: 4,
                state: &test_state(),
                gate: None,
                resume: None,
                progress: watch::channel(None).0,
            },
            rx,
            durable_tx,
            &mut Watermarks::new("test", None),
        )
        .await;
        let durable = *durable_rx.borrow();
        (result, durable)
    }

    #[tokio::test]
    async fn durable_position_reaches_the_last_batch_despite_reordering() {
        let (result, durable) = apply_four(None).await;
        result.unwrap();
        assert_eq!(durable, Lsn(40));
    }

    #[tokio::test]
    async fn failed_batch_stops_the_position_before_it() {
        let (result, durable) = apply_four(Some(2)).await;
        assert_eq!(result.unwrap_err().message, "injected");
        assert_eq!(durable, Lsn(20), "nothing at or after the failed batch may be durable");
    }
}
