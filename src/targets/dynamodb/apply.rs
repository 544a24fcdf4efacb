//! The DynamoDB target: translates each batch through the mapping and applies the writes with
//! position guards on `concurrency` workers.
//!
//! Ordering: a write goes to the worker chosen by a hash of (table, key), and each worker
//! applies its queue in order, so changes to one item keep their source order while different
//! items proceed in parallel. A batch is durable when every write of it has been acknowledged
//! by DynamoDB (applied, or found already applied by the guard).
//!
//! Failures: throttling, 5xx and network errors are retried with exponential backoff and jitter
//! for up to `retry_for`, and the batch stays unacknowledged meanwhile. Writes that can never
//! apply (an item over 400 KB, a value DynamoDB rejects, a row the mapping cannot translate) go
//! to the dead-letter file with the reason and position, and are counted. Anything else
//! (a missing table, denied access) stops the pipeline.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::retry::retry;
use sluice_core::{action, Action, GaveUp, RetryPolicy, Shutdown};
use sluice_dynamodb::{
    item_size, Attr, ClientOptions, DynamoClient, DynamoError, GuardedWrite, Item, Outcome, WriteAction,
    MAX_ITEM_BYTES,
};
use tokio::sync::{mpsc, Notify};

use crate::error::{ErrorKind, TargetError};
use crate::targets::dead_letter::DeadLetter;
use crate::targets::dynamodb::config::{DynamoConfig, WriteMode};
use crate::targets::{OpBatch, Receipt, Sourced, Target, TargetStats};
use sluice_core::Position;

pub struct DynamoTarget {
    workers: Vec<mpsc::Sender<Job>>,
    /// The worker tasks: one that ends (a panic) fails the pipeline at the next submit.
    tasks: tokio::task::JoinSet<()>,
    dead_letter: Arc<DeadLetter>,
}

struct Job {
    write: GuardedWrite,
    position: Position,
    /// The position was never delivered before (`EventBatch::redelivery_horizon`).
    fresh: bool,
    /// The source table (or `message:<prefix>`), named only when a write is dead-lettered.
    source: Arc<str>,
    batch: Arc<BatchState>,
    /// Set once a worker has applied (or dead-lettered, or failed) the write.
    handled: bool,
}

impl Job {
    /// The write is handled: its batch counts it done (on drop).
    fn handled(mut self) {
        self.handled = true;
    }
}

impl Drop for Job {
    /// A job dropped unhandled (its worker panicked, or stopped with jobs queued) fails its
    /// batch, so that the batch's receipt resolves instead of waiting forever.
    fn drop(&mut self) {
        if !self.handled {
            self.batch.fail(TargetError {
                target: "dynamodb",
                kind: ErrorKind::Fatal,
                message: "a DynamoDB worker stopped before applying a write of this batch".into(),
                source: None,
            });
        }
        self.batch.finish_one();
    }
}

/// Completion of one batch's writes.
struct BatchState {
    remaining: AtomicUsize,
    done: Notify,
    failure: Mutex<Option<TargetError>>,
}

impl BatchState {
    fn finish_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    fn fail(&self, error: TargetError) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert(error);
    }
}

/// The SDK client settings of a DynamoDB target configuration.
pub fn client_options(config: &DynamoConfig) -> ClientOptions {
    ClientOptions {
        endpoint_url: config.endpoint_url.clone(),
        region: config.region.clone(),
        static_credentials: match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
            _ => None,
        },
        request_timeout: Some(config.request_timeout),
        retry_for: config.retry_for,
    }
}

impl DynamoTarget {
    pub async fn open(
        config: &DynamoConfig,
        stats: Arc<TargetStats>,
        dead_letter: Arc<DeadLetter>,
    ) -> Result<Self, TargetError> {
        let client = DynamoClient::connect(&client_options(config)).await;
        let mut tasks = tokio::task::JoinSet::new();
        let workers = (0..config.concurrency)
            .map(|_| {
                let (tx, rx) = mpsc::channel(256);
                let settings = WorkerSettings {
                    mode: config.write_mode,
                    transaction_size: config.transaction_size,
                    batch_size: config.batch_size,
                    retry_for: config.retry_for,
                };
                tasks.spawn(worker(
                    client.clone(),
                    rx,
                    Arc::clone(&dead_letter),
                    Arc::clone(&stats),
                    settings,
                ));
                tx
            })
            .collect();
        Ok(DynamoTarget { workers, tasks, dead_letter })
    }

    fn worker_for(&self, write: &GuardedWrite) -> usize {
        let mut hasher = DefaultHasher::new();
        write.table.hash(&mut hasher);
        for (name, value) in &write.key {
            name.hash(&mut hasher);
            if let Attr::S(s) = value {
                s.hash(&mut hasher);
            }
        }
        (hasher.finish() % self.workers.len() as u64) as usize
    }
}

impl Target for DynamoTarget {
    type Op = GuardedWrite;

    async fn submit(&mut self, batch: OpBatch<GuardedWrite>) -> Result<Receipt, TargetError> {
        if let Some(ended) = self.tasks.try_join_next() {
            let message = match ended {
                Err(error) if error.is_panic() => format!("a DynamoDB worker panicked: {error}"),
                _ => "a DynamoDB worker stopped".to_owned(),
            };
            return Err(TargetError { target: "dynamodb", kind: ErrorKind::Fatal, message, source: None });
        }
        let mut jobs = Vec::with_capacity(batch.ops.len());
        for Sourced { op: write, position, source } in batch.ops {
            if let WriteAction::Put(item) | WriteAction::Update { set: item, .. } = &write.action {
                let size = item_size(item) + item_size(&write.key) + write.version_attribute.len() + 21;
                if size > MAX_ITEM_BYTES {
                    let reason = format!("item of {size} bytes exceeds DynamoDB's 400 KB limit");
                    self.dead_letter
                        .record(
                            position,
                            &source,
                            Some(&|line: &mut Vec<u8>| write_details(line, &write)),
                            &reason,
                        )
                        .await?;
                    continue;
                }
            }
            jobs.push((write, position, source));
        }
        let state = Arc::new(BatchState {
            remaining: AtomicUsize::new(jobs.len() + 1),
            done: Notify::new(),
            failure: Mutex::new(None),
        });
        for (write, position, source) in jobs {
            let worker = self.worker_for(&write);
            let fresh = batch.redelivery_horizon.is_some_and(|horizon| position.commit_lsn > horizon);
            let job = Job { write, position, fresh, source, batch: Arc::clone(&state), handled: false };
            self.workers[worker].send(job).await.map_err(|_| TargetError {
                target: "dynamodb",
                kind: ErrorKind::Fatal,
                message: "a DynamoDB worker stopped".into(),
                source: None,
            })?;
        }
        // The extra count keeps the batch open until every job is queued.
        state.finish_one();
        Ok(Box::pin(async move {
            loop {
                let notified = state.done.notified();
                if state.remaining.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
            match state.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(error) => Err(error),
                None => Ok(()),
            }
        }))
    }
}

async fn worker(
    client: DynamoClient,
    mut jobs: mpsc::Receiver<Job>,
    dead_letter: Arc<DeadLetter>,
    stats: Arc<TargetStats>,
    settings: WorkerSettings,
) {
    let mut group: Vec<Job> = Vec::new();
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        crate::faults::panic_at("dynamodb-worker");
        let batchable = |job: &Job| !matches!(job.write.action, WriteAction::Update { .. });
        match settings.mode {
            WriteMode::Single => group.push(first),
            // Gather what is already queued, up to the transaction size, stopping before a
            // second write to the same item (a transaction touches each item once).
            WriteMode::Transaction => {
                group.push(first);
                while group.len() < settings.transaction_size {
                    let Ok(job) = jobs.try_recv() else { break };
                    if group.iter().any(|g| g.write.table == job.write.table && g.write.key == job.write.key)
                    {
                        held = Some(job);
                        break;
                    }
                    group.push(job);
                }
            }
            // Gather queued puts and deletes up to the batch size, stopping before an update
            // (applied alone, conditionally, in its turn).
            WriteMode::Batch if batchable(&first) => {
                group.push(first);
                while group.len() < settings.batch_size {
                    let Ok(job) = jobs.try_recv() else { break };
                    if !batchable(&job) {
                        held = Some(job);
                        break;
                    }
                    group.push(job);
                }
                apply_batch(&client, &group, &dead_letter, &stats, settings.retry_for).await;
                group.drain(..).for_each(Job::handled);
                continue;
            }
            WriteMode::Batch => group.push(first),
        }
        if group.len() == 1 {
            let job = group.pop().expect("one job");
            apply_one(&client, &job, &dead_letter, &stats, settings.retry_for).await;
            job.handled();
        } else {
            apply_group(&client, &group, &dead_letter, &stats, settings.retry_for).await;
            group.drain(..).for_each(Job::handled);
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct WorkerSettings {
    mode: WriteMode,
    transaction_size: usize,
    batch_size: usize,
    retry_for: Duration,
}

/// The retry policy of the target's writes: `pipeline.retry_for`, from 50 ms up to 5 s.
fn write_policy(retry_for: Duration) -> RetryPolicy {
    RetryPolicy::new(retry_for).with_delays(Duration::from_millis(50), Duration::from_secs(5))
}

/// Runs one request under the write policy, counting each retry. The target's writes do not
/// stop on shutdown: the pipeline abandons writes still in flight after `shutdown_timeout`.
async fn retried<T, F, Fut>(
    stats: &TargetStats,
    retry_for: Duration,
    what: &str,
    request: F,
) -> Result<T, DynamoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DynamoError>>,
{
    let on_retry = |_: &DynamoError| {
        stats.retries.fetch_add(1, Ordering::Relaxed);
    };
    let what = format!("DynamoDB {what}");
    match retry(write_policy(retry_for), &Shutdown::never(), &what, request, on_retry).await {
        Ok(value) => Ok(value),
        Err(GaveUp::Failed { error, .. }) => Err(error),
        Err(GaveUp::Shutdown) => unreachable!("a signal that is never requested stopped a retry"),
    }
}

/// One write: retried while transient, dead-lettered when poison, failing its batch when fatal.
async fn apply_one(
    client: &DynamoClient,
    job: &Job,
    dead_letter: &DeadLetter,
    stats: &TargetStats,
    retry_for: Duration,
) {
    let error = match retried(stats, retry_for, "write", || timed(client.apply(&job.write))).await {
        Ok(outcome) => return count(stats, outcome),
        Err(error) => error,
    };
    match action(error.kind) {
        Action::DeadLetter => {
            if let Err(e) = dead_letter
                .record(
                    job.position,
                    &job.source,
                    Some(&|line: &mut Vec<u8>| write_details(line, &job.write)),
                    &error.to_string(),
                )
                .await
            {
                job.batch.fail(e);
            }
        }
        Action::Retry | Action::Stop => job.batch.fail(fatal(error, retry_for)),
    }
}

/// Several writes to distinct items in one TransactWriteItems request.
async fn apply_group(
    client: &DynamoClient,
    group: &[Job],
    dead_letter: &DeadLetter,
    stats: &TargetStats,
    retry_for: Duration,
) {
    let writes: Vec<GuardedWrite> = group.iter().map(|j| j.write.clone()).collect();
    apply_together(client, group, dead_letter, stats, retry_for, "transaction", 0, || {
        client.apply_transaction(&writes)
    })
    .await;
}

/// `batch` mode: the group's puts and deletes, the last write per item only (each is the whole
/// item, so earlier ones in the group are superseded), read and written together.
async fn apply_batch(
    client: &DynamoClient,
    group: &[Job],
    dead_letter: &DeadLetter,
    stats: &TargetStats,
    retry_for: Duration,
) {
    let mut last: Vec<&Job> = Vec::with_capacity(group.len());
    for job in group {
        match last.iter_mut().find(|l| l.write.table == job.write.table && l.write.key == job.write.key) {
            Some(slot) => *slot = job,
            None => last.push(job),
        }
    }
    let writes: Vec<GuardedWrite> = last.iter().map(|j| j.write.clone()).collect();
    let fresh: Vec<bool> = last.iter().map(|j| j.fresh).collect();
    let superseded = (group.len() - last.len()) as u64;
    apply_together(client, group, dead_letter, stats, retry_for, "batch", superseded, || {
        client.apply_batch(&writes, &fresh)
    })
    .await;
}

/// One multi-item request for a group, retried while transient. A request DynamoDB rejects
/// (a write it finds invalid) falls back to single guarded writes, in order, which classify
/// each write; any other failure fails every batch the group touches (none is durable).
/// `superseded` writes of the group count as already applied when the request succeeds.
#[allow(clippy::too_many_arguments)]
async fn apply_together<F, Fut>(
    client: &DynamoClient,
    group: &[Job],
    dead_letter: &DeadLetter,
    stats: &TargetStats,
    retry_for: Duration,
    what: &str,
    superseded: u64,
    mut request: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Outcome>, DynamoError>>,
{
    let error = match retried(stats, retry_for, what, || timed(request())).await {
        Ok(outcomes) => {
            for outcome in outcomes {
                count(stats, outcome);
            }
            stats.already_applied.fetch_add(superseded, Ordering::Relaxed);
            return;
        }
        Err(error) => error,
    };
    match action(error.kind) {
        Action::DeadLetter => {
            for job in group {
                apply_one(client, job, dead_letter, stats, retry_for).await;
            }
        }
        Action::Retry | Action::Stop => {
            let message = fatal_message(&error, retry_for);
            let error = Arc::new(error);
            for job in group {
                job.batch.fail(TargetError {
                    target: "dynamodb",
                    kind: ErrorKind::Fatal,
                    message: message.clone(),
                    source: Some(Box::new(Arc::clone(&error))),
                });
            }
        }
    }
}

/// Records a request's latency.
async fn timed<T>(request: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let result = request.await;
    metrics::histogram!(crate::metrics::TARGET_WRITE_SECONDS, "target" => "dynamodb")
        .record(started.elapsed().as_secs_f64());
    result
}

fn count(stats: &TargetStats, outcome: Outcome) {
    match outcome {
        Outcome::Applied => stats.applied.fetch_add(1, Ordering::Relaxed),
        Outcome::AlreadyApplied => stats.already_applied.fetch_add(1, Ordering::Relaxed),
    };
}

/// The error that stops the pipeline after a write failed for good; the DynamoDB error is its
/// source.
fn fatal(error: DynamoError, retry_for: Duration) -> TargetError {
    let message = fatal_message(&error, retry_for);
    TargetError { target: "dynamodb", kind: ErrorKind::Fatal, message, source: Some(Box::new(error)) }
}

fn fatal_message(error: &DynamoError, retry_for: Duration) -> String {
    if error.is_transient() {
        format!("a write is still failing after {}s of retries (pipeline.retry_for)", retry_for.as_secs())
    } else {
        "a write failed".to_owned()
    }
}

/// The dead-letter entry's fields for a write: target table, key and item.
fn write_details(line: &mut Vec<u8>, write: &GuardedWrite) {
    line.extend_from_slice(b",\"target_table\":");
    crate::json::string(line, &write.table);
    line.extend_from_slice(b",\"key\":");
    attrs_json(line, &write.key);
    if let WriteAction::Put(item) | WriteAction::Update { set: item, .. } = &write.action {
        line.extend_from_slice(b",\"item\":");
        attrs_json(line, item);
    }
}

/// DynamoDB's JSON form of attributes (`{"S": "x"}`), as its CLI and exports print them.
fn attrs_json(out: &mut Vec<u8>, item: &Item) {
    out.push(b'{');
    for (i, (name, value)) in item.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        crate::json::string(out, name);
        out.push(b':');
        attr_json(out, value);
    }
    out.push(b'}');
}

fn attr_json(out: &mut Vec<u8>, value: &Attr) {
    use base64::Engine;
    let tagged = |out: &mut Vec<u8>, tag: &str, body: &dyn Fn(&mut Vec<u8>)| {
        out.extend_from_slice(format!("{{\"{tag}\":").as_bytes());
        body(out);
        out.push(b'}');
    };
    match value {
        Attr::S(s) => tagged(out, "S", &|o| crate::json::string(o, s)),
        Attr::N(n) => tagged(out, "N", &|o| crate::json::string(o, n)),
        Attr::B(b) => tagged(out, "B", &|o| {
            crate::json::string(o, &base64::engine::general_purpose::STANDARD.encode(b))
        }),
        Attr::Bool(b) => tagged(out, "BOOL", &|o| o.extend_from_slice(if *b { b"true" } else { b"false" })),
        Attr::Null => out.extend_from_slice(b"{\"NULL\":true}"),
        Attr::L(items) => tagged(out, "L", &|o| crate::json::array(o, items, attr_json)),
        Attr::M(map) => tagged(out, "M", &|o| attrs_json(o, map)),
        Attr::Ss(items) | Attr::Ns(items) => {
            let tag = if matches!(value, Attr::Ss(_)) { "SS" } else { "NS" };
            tagged(out, tag, &|o| crate::json::array(o, items, |o, item| crate::json::string(o, item)))
        }
    }
}
