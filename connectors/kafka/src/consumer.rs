//! The consumer side: one member of a consumer group, whose offsets are committed only for
//! records the pipeline reports durable.
//!
//! ```text
//! consumer thread ── poll ──▶ per-partition batches ──Fetched (bounded channel)──▶ pipeline
//!        ▲                                                                          │
//!        └──── commit (async, every commit_interval; sync on revoke and stop) ◀── durable(tp, offset)
//! ```
//!
//! - **One thread owns the consumer.** librdkafka serves rebalances inside `poll`, so the
//!   thread keeps polling even while the pipeline is full: it pauses its partitions instead of
//!   blocking, and a rebalance is never held up by backpressure.
//! - **Commits follow durability.** A partition's offset is committed only up to what
//!   [`KafkaConsumer::durable`] reported for it, which the pipeline reports over an unbroken
//!   prefix of durable batches. Nothing is committed for a partition while its batches wait.
//! - **Revocation is clean.** When partitions are revoked, batches of theirs not yet handed
//!   out are dropped, and the revocation waits up to `revoke_timeout` for the handed-out ones
//!   to become durable, then commits synchronously. Batches still not durable then are
//!   abandoned without a commit: the next owner reads them again, and the targets' position
//!   guards absorb the second copy. Each assignment of a partition is a new *generation*;
//!   reports from an older one are ignored.
//! - **Fencing, for targets written without a per-write guard** ([`ConsumerOptions::fencing`]).
//!   A partition's previous owner may still have a write in flight when the partition is
//!   assigned here. A newly assigned partition is therefore paused for the fencing delay
//!   (`revoke_timeout` + the target's request timeout + [`SESSION_SLACK`]) before any of its
//!   records is read, and a member whose revocation would abandon a batch still in flight
//!   exits at once instead of writing it after the partition's next owner started (its
//!   supervisor restarts it). With guarded writes neither is needed: the guard absorbs a late
//!   write.
//! - Eager rebalancing (librdkafka's default `range,roundrobin`): every rebalance revokes all
//!   partitions and assigns them anew, so a member that keeps a partition goes on from its
//!   own commit.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::mpsc;

use crate::QuietContext;

/// How to reach the brokers, which topics to read and how to batch them. `Debug` hides the
/// values of `extra` properties that hold secrets.
#[derive(Clone)]
pub struct ConsumerOptions {
    /// `host:port[,host:port…]`
    pub brokers: String,
    /// `group.id`: the members of one group share the topics' partitions.
    pub group_id: String,
    /// Topic names, or regular expressions starting with `^`.
    pub topics: Vec<String>,
    /// `client.id`, as brokers log the consumer.
    pub client_id: String,
    /// Records per handed-out batch at most.
    pub batch_max_records: usize,
    /// How long a partition's first buffered record waits for more before its batch is handed
    /// out (a batch also goes as soon as nothing more is ready to read).
    pub linger: Duration,
    /// How often durable offsets are committed.
    pub commit_interval: Duration,
    /// How long a revocation waits for the revoked partitions' handed-out batches.
    pub revoke_timeout: Duration,
    /// Further librdkafka properties (`security.protocol`, `session.timeout.ms`, …).
    pub extra: Vec<(String, String)>,
    /// The target's request timeout when it writes without a per-write guard (fencing, see
    /// the module header); `None` when every write is guarded.
    pub fencing: Option<Duration>,
}

/// Added to a fencing delay: how much later than the group coordinator a member that lost
/// its session (a zombie, cut off from the brokers) may notice, and start its revocation.
pub const SESSION_SLACK: Duration = Duration::from_secs(5);

impl ConsumerOptions {
    /// How long a newly assigned partition waits before it is read: zero when every write is
    /// guarded.
    pub fn fencing_delay(&self) -> Duration {
        self.fencing
            .map_or(Duration::ZERO, |request_timeout| self.revoke_timeout + request_timeout + SESSION_SLACK)
    }
}

impl std::fmt::Debug for ConsumerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra = crate::redacted(&self.extra);
        f.debug_struct("ConsumerOptions")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("batch_max_records", &self.batch_max_records)
            .field("linger", &self.linger)
            .field("fencing", &self.fencing)
            .field("extra", &extra)
            .finish()
    }
}

/// One record as read. `Debug` shows its place, never its key, value or headers.
pub struct Consumed {
    /// Its offset in the partition.
    pub offset: i64,
    /// The record key.
    pub key: Option<Vec<u8>>,
    /// The value; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// The headers, in order (a header without a value has an empty one).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Consumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumed").field("offset", &self.offset).finish_non_exhaustive()
    }
}

impl Consumed {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

/// A topic partition, as the pipeline names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Consecutive records of one partition, in offset order.
#[derive(Debug)]
pub struct Fetched {
    /// Where they come from.
    pub partition: TopicPartition,
    /// The assignment they were read under (see the module header).
    pub generation: u64,
    /// The records.
    pub records: Vec<Consumed>,
    /// The offset after the last record: what to commit once they are durable.
    pub next_offset: i64,
}

/// A partition this member owns, for metrics and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionStatus {
    /// Which.
    pub partition: TopicPartition,
    /// The offset through which records are durable, when reported.
    pub durable: Option<i64>,
    /// The offset of the first record read under this assignment (where the group's commit
    /// let it start).
    pub read_from: Option<i64>,
    /// The partition's high watermark as last fetched, when known.
    pub high_watermark: Option<i64>,
}

/// Counters of the consumer, for metrics.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Offset commits that succeeded.
    pub commits: AtomicU64,
    /// Offset commits that failed (retried at the next interval).
    pub commit_failures: AtomicU64,
    /// Rebalances that assigned or revoked partitions of this member.
    pub rebalances: AtomicU64,
}

/// What can go wrong consuming.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// librdkafka refused the consumer's properties.
    #[error("the Kafka consumer's configuration is refused")]
    Config(#[source] KafkaError),
    /// A topic named in the subscription does not exist.
    #[error("Kafka topic {topic:?} does not exist")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// The subscription or a metadata request failed.
    #[error("cannot subscribe to the Kafka topics")]
    Subscribe(#[source] KafkaError),
    /// Consuming failed in a way retrying does not help (authorization, an invalid group).
    #[error("the Kafka consumer failed")]
    Consume(#[source] KafkaError),
    /// The consumer thread panicked.
    #[error("the Kafka consumer thread panicked")]
    Panicked,
}

/// What a partition's owner knows of it.
#[derive(Debug)]
struct Owned {
    generation: u64,
    handed_out: Option<i64>,
    durable: Option<i64>,
    committed: Option<i64>,
    read_from: Option<i64>,
    high_watermark: Option<i64>,
    /// Paused until then: a previous owner's write may still land (fencing).
    fenced_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    owned: HashMap<TopicPartition, Owned>,
    next_generation: u64,
    /// Records buffered per partition, not yet handed out.
    buffered: HashMap<TopicPartition, (Instant, Fetched)>,
    /// Full batches waiting for room in the channel, in read order.
    ready: VecDeque<Fetched>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a durable offset is reported.
    durable: Condvar,
    stop: AtomicBool,
    stats: Arc<ConsumerStats>,
    revoke_timeout: Duration,
    /// `ConsumerOptions::fencing_delay`; zero when writes are guarded.
    fencing_delay: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The consumer's context: librdkafka's logs through `tracing`, and the rebalance protocol
/// described in the module header.
struct GroupContext {
    quiet: QuietContext,
    shared: Arc<Shared>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.quiet.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.quiet.error(error, reason);
    }

    /// The partitions' high watermarks, from librdkafka's statistics (no request of its own).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut state = self.shared.lock();
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                let tp = TopicPartition { topic: topic.as_str().into(), partition: *partition };
                if let Some(owned) = state.owned.get_mut(&tp).filter(|_| stats.hi_offset >= 0) {
                    owned.high_watermark = Some(stats.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        self.shared.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        let revoked: Vec<TopicPartition> = list
            .elements()
            .iter()
            .map(|e| TopicPartition { topic: e.topic().into(), partition: e.partition() })
            .collect();
        let mut state = self.shared.lock();
        // Not handed out: dropped, read again by the next owner.
        state.buffered.retain(|tp, _| !revoked.contains(tp));
        state.ready.retain(|batch| !revoked.contains(&batch.partition));
        let deadline = Instant::now() + self.shared.revoke_timeout;
        let waiting = |state: &State| {
            revoked.iter().any(|tp| {
                state.owned.get(tp).is_some_and(|o| o.handed_out.is_some() && o.durable < o.handed_out)
            })
        };
        while waiting(&state) && !self.shared.stop.load(Ordering::Relaxed) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if !self.shared.fencing_delay.is_zero() {
                    // Unguarded writes: the batch must not land after the next owner starts.
                    tracing::error!(
                    timeout_ms = self.shared.revoke_timeout.as_millis() as u64,
                    "kafka source: revoked partitions still have batches in flight after source.kafka.revoke_timeout; \
                     the target's writes are unguarded (write_mode = \"batch\"), so this member exits at once rather \
                     than write them after the partitions' next owner starts (the next owner reads them again)"
                );
                    std::process::exit(75);
                }
                tracing::warn!(
                    timeout_ms = self.shared.revoke_timeout.as_millis() as u64,
                    "kafka source: revoked partitions still have batches in flight; abandoning them uncommitted \
                     (the next owner reads them again, the target's position guard absorbs the repeat)"
                );
                break;
            }
            state = self.shared.durable.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        let commit = commit_list(&state, |tp| revoked.contains(tp));
        for tp in &revoked {
            state.owned.remove(tp);
        }
        drop(state);
        if let Some(list) = commit {
            match consumer.commit(&list, CommitMode::Sync) {
                Ok(()) => {
                    self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    self.shared.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %error, "kafka source: cannot commit the revoked partitions' offsets; the next owner reads from the last commit");
                }
            }
        }
        tracing::info!(partitions = %names(&revoked), "kafka source: partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.shared.stats.rebalances.fetch_add(1, Ordering::Relaxed);
                let fenced_until = (!self.shared.fencing_delay.is_zero())
                    .then(|| Instant::now() + self.shared.fencing_delay);
                let mut state = self.shared.lock();
                let mut assigned = Vec::new();
                for element in list.elements() {
                    let tp = TopicPartition { topic: element.topic().into(), partition: element.partition() };
                    state.next_generation += 1;
                    let generation = state.next_generation;
                    state.owned.insert(
                        tp.clone(),
                        Owned {
                            generation,
                            handed_out: None,
                            durable: None,
                            committed: None,
                            read_from: None,
                            high_watermark: None,
                            fenced_until,
                        },
                    );
                    assigned.push(tp);
                }
                drop(state);
                if fenced_until.is_some() && list.count() > 0 {
                    if let Err(error) = consumer.pause(list) {
                        // Not paused: nothing of them may be handed out before the fence ends,
                        // so the member stops rather than write early.
                        tracing::error!(error = %error, "kafka source: cannot pause the assigned partitions for the fencing delay; exiting");
                        std::process::exit(75);
                    }
                    tracing::info!(
                        partitions = %names(&assigned),
                        delay_s = self.shared.fencing_delay.as_secs(),
                        "kafka source: fencing: holding the assigned partitions until a previous owner's last unguarded \
                         write has landed (source.kafka.revoke_timeout + target.request_timeout + {} s)",
                        SESSION_SLACK.as_secs()
                    );
                }
                if assigned.is_empty() {
                    tracing::warn!(
                        "kafka source: this member was assigned no partition: the group has more members than its topics \
                         have partitions; it stands by until a rebalance gives it one"
                    );
                } else {
                    tracing::info!(partitions = %names(&assigned), "kafka source: partitions assigned");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(error = %error, "kafka source: rebalance failed"),
        }
    }
}

fn names(partitions: &[TopicPartition]) -> String {
    partitions.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The offsets to commit for the owned partitions `which` selects: those whose durable offset
/// is past their last commit.
fn commit_list(state: &State, which: impl Fn(&TopicPartition) -> bool) -> Option<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for (tp, owned) in &state.owned {
        let Some(durable) = owned.durable.filter(|d| Some(*d) > owned.committed) else { continue };
        if which(tp) {
            let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(durable));
        }
    }
    (list.count() > 0).then_some(list)
}

/// A consumer group member reading on its own thread (see the module header).
pub struct KafkaConsumer {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<Result<(), ConsumerError>>>>,
}

impl KafkaConsumer {
    /// Creates the consumer, checks that every named topic exists, subscribes, and starts the
    /// thread that hands batches to `batches`.
    pub fn start(options: &ConsumerOptions, batches: mpsc::Sender<Fetched>) -> Result<Self, ConsumerError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &options.brokers)
            .set("group.id", &options.group_id)
            .set("client.id", &options.client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Bounds what librdkafka prefetches per partition (memory stays bounded).
            .set("queued.max.messages.kbytes", "16384")
            // The partitions' high watermarks, for the lag metric.
            .set("statistics.interval.ms", "5000");
        for (key, value) in &options.extra {
            config.set(key, value);
        }
        let stats = Arc::new(ConsumerStats::default());
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            durable: Condvar::new(),
            stop: AtomicBool::new(false),
            stats,
            revoke_timeout: options.revoke_timeout,
            fencing_delay: options.fencing_delay(),
        });
        let context = GroupContext { quiet: QuietContext::default(), shared: Arc::clone(&shared) };
        let consumer: BaseConsumer<GroupContext> =
            config.create_with_context(context).map_err(ConsumerError::Config)?;
        for topic in options.topics.iter().filter(|t| !t.starts_with('^')) {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .map_err(ConsumerError::Subscribe)?;
            let exists = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !exists {
                return Err(ConsumerError::UnknownTopic { topic: topic.clone() });
            }
        }
        let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(ConsumerError::Subscribe)?;
        let (thread_shared, options) = (Arc::clone(&shared), options.clone());
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || poll_loop(&consumer, &thread_shared, &options, &batches))
            .map_err(|e| ConsumerError::Consume(KafkaError::ClientCreation(e.to_string())))?;
        Ok(KafkaConsumer { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Reports that `partition`'s records before `next_offset`, read under `generation`, are
    /// durable (reports of an older generation are ignored; offsets never go back).
    pub fn durable(&self, partition: &TopicPartition, generation: u64, next_offset: i64) {
        let mut state = self.shared.lock();
        if let Some(owned) = state.owned.get_mut(partition).filter(|o| o.generation == generation) {
            if owned.durable < Some(next_offset) {
                owned.durable = Some(next_offset);
            }
        }
        drop(state);
        self.shared.durable.notify_all();
    }

    /// The partitions this member owns now.
    pub fn partitions(&self) -> Vec<PartitionStatus> {
        let state = self.shared.lock();
        let mut partitions: Vec<PartitionStatus> = state
            .owned
            .iter()
            .map(|(tp, o)| PartitionStatus {
                partition: tp.clone(),
                durable: o.durable,
                read_from: o.read_from,
                high_watermark: o.high_watermark,
            })
            .collect();
        partitions.sort_by(|a, b| a.partition.cmp(&b.partition));
        partitions
    }

    /// The consumer's counters.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Stops the thread after a last synchronous commit of what is durable, and leaves the
    /// group; the thread's error if it ended with one.
    pub async fn stop(&self) -> Result<(), ConsumerError> {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.durable.notify_all();
        self.join().await
    }

    /// Waits for the thread to end by itself (the channel closed, or an error) and returns
    /// its outcome; at once when it was joined before.
    pub async fn join(&self) -> Result<(), ConsumerError> {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(thread) = thread else { return Ok(()) };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|_| ConsumerError::Panicked)?
            .map_err(|_| ConsumerError::Panicked)?
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.durable.notify_all();
    }
}

/// The consumer thread: read, batch per partition, hand out, commit.
fn poll_loop(
    consumer: &BaseConsumer<GroupContext>,
    shared: &Shared,
    options: &ConsumerOptions,
    batches: &mpsc::Sender<Fetched>,
) -> Result<(), ConsumerError> {
    let batch_max = options.batch_max_records.max(1);
    let mut last_commit = Instant::now();
    let mut paused = false;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            commit(consumer, shared, CommitMode::Sync);
            consumer.unsubscribe();
            return Ok(());
        }
        // Hand out what is ready, as far as the channel takes it.
        let mut closed = false;
        {
            let mut state = shared.lock();
            while let Some(batch) = state.ready.pop_front() {
                let (tp, generation, next) = (batch.partition.clone(), batch.generation, batch.next_offset);
                match batches.try_send(batch) {
                    Ok(()) => {
                        if let Some(owned) = state.owned.get_mut(&tp).filter(|o| o.generation == generation) {
                            owned.handed_out = Some(next);
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(batch)) => {
                        state.ready.push_front(batch);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        closed = true;
                        break;
                    }
                }
            }
            let full = !state.ready.is_empty();
            if full != paused {
                if let Ok(assignment) = consumer.assignment() {
                    let _ = if full {
                        consumer.pause(&assignment)
                    } else {
                        consumer.resume(&unfenced(&assignment, &state))
                    };
                }
                paused = full;
            }
            // Fences that are over: their partitions are read from now on (guarded writes set none).
            let mut ended = TopicPartitionList::new();
            if !shared.fencing_delay.is_zero() {
                let now = Instant::now();
                for (tp, owned) in &mut state.owned {
                    if owned.fenced_until.is_some_and(|until| until <= now) {
                        owned.fenced_until = None;
                        ended.add_partition(&tp.topic, tp.partition);
                    }
                }
            }
            if ended.count() > 0 {
                tracing::info!("kafka source: fencing delay over; reading the assigned partitions");
                if !paused {
                    let _ = consumer.resume(&ended);
                }
            }
        }
        if closed {
            commit(consumer, shared, CommitMode::Sync);
            consumer.unsubscribe();
            return Ok(());
        }
        if last_commit.elapsed() >= options.commit_interval {
            commit(consumer, shared, CommitMode::Async);
            last_commit = Instant::now();
        }
        let oldest = shared.lock().buffered.values().map(|(since, _)| *since).min();
        let wait = match oldest {
            Some(since) => options.linger.saturating_sub(since.elapsed()),
            None => Duration::from_millis(100),
        };
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                let tp = TopicPartition { topic: message.topic().into(), partition: message.partition() };
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                let record = Consumed {
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    headers,
                };
                let mut state = shared.lock();
                let Some(owned) = state.owned.get_mut(&tp) else { continue };
                owned.read_from.get_or_insert(record.offset);
                let generation = owned.generation;
                let (_, batch) = state.buffered.entry(tp.clone()).or_insert_with(|| {
                    (
                        Instant::now(),
                        Fetched { partition: tp.clone(), generation, records: Vec::new(), next_offset: 0 },
                    )
                });
                batch.next_offset = record.offset + 1;
                batch.records.push(record);
                if batch.records.len() >= batch_max {
                    if let Some((_, batch)) = state.buffered.remove(&tp) {
                        state.ready.push_back(batch);
                    }
                }
                // Partitions whose linger is over go too.
                flush(&mut state, Some(options.linger));
            }
            Some(Err(error)) => match error.rdkafka_error_code() {
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                    return Err(ConsumerError::UnknownTopic { topic: format!("{error}") });
                }
                Some(
                    RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
                    | RDKafkaErrorCode::InvalidGroupId
                    | RDKafkaErrorCode::SaslAuthenticationFailed,
                ) => return Err(ConsumerError::Consume(error)),
                _ => tracing::warn!(error = %error, "kafka source: a read failed; retrying"),
            },
            // Nothing more to read now: hand out what is buffered.
            None => flush(&mut shared.lock(), None),
        }
    }
}

/// The partitions of `list` that no fence holds.
fn unfenced(list: &TopicPartitionList, state: &State) -> TopicPartitionList {
    let mut open = TopicPartitionList::new();
    for element in list.elements() {
        let tp = TopicPartition { topic: element.topic().into(), partition: element.partition() };
        if state.owned.get(&tp).is_none_or(|o| o.fenced_until.is_none()) {
            open.add_partition(element.topic(), element.partition());
        }
    }
    open
}

/// Moves buffered batches to `ready`: all of them, or those older than `linger`.
fn flush(state: &mut State, linger: Option<Duration>) {
    let due: Vec<TopicPartition> = state
        .buffered
        .iter()
        .filter(|(_, (since, _))| linger.is_none_or(|l| since.elapsed() >= l))
        .map(|(tp, _)| tp.clone())
        .collect();
    for tp in due {
        if let Some((_, batch)) = state.buffered.remove(&tp) {
            state.ready.push_back(batch);
        }
    }
}

/// Commits the owned partitions' durable offsets that are past their last commit.
fn commit(consumer: &BaseConsumer<GroupContext>, shared: &Shared, mode: CommitMode) {
    let mut state = shared.lock();
    let Some(list) = commit_list(&state, |_| true) else { return };
    let result: KafkaResult<()> = consumer.commit(&list, mode);
    match result {
        Ok(()) => {
            shared.stats.commits.fetch_add(1, Ordering::Relaxed);
            for element in list.elements() {
                let tp = TopicPartition { topic: element.topic().into(), partition: element.partition() };
                if let (Some(owned), Offset::Offset(offset)) = (state.owned.get_mut(&tp), element.offset()) {
                    owned.committed = Some(offset);
                }
            }
        }
        Err(error) => {
            shared.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            drop(state);
            tracing::warn!(error = %error, "kafka source: cannot commit offsets; retrying at the next interval");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(partition: i32) -> TopicPartition {
        TopicPartition { topic: "t".into(), partition }
    }

    #[test]
    fn only_durable_offsets_past_the_last_commit_are_committed() {
        let mut state = State::default();
        let owned = |durable, committed| Owned {
            generation: 1,
            handed_out: Some(100),
            durable,
            committed,
            read_from: None,
            high_watermark: None,
            fenced_until: None,
        };
        state.owned.insert(tp(0), owned(None, None));
        state.owned.insert(tp(1), owned(Some(50), Some(50)));
        state.owned.insert(tp(2), owned(Some(70), Some(40)));
        let list = commit_list(&state, |_| true).expect("partition 2 is due");
        let elements = list.elements();
        assert_eq!(elements.len(), 1, "nothing reported durable, or already committed, is not committed");
        assert_eq!((elements[0].partition(), elements[0].offset()), (2, Offset::Offset(70)));
        assert!(commit_list(&state, |tp| tp.partition != 2).is_none());
    }

    #[test]
    fn debug_shows_neither_record_contents_nor_secret_properties() {
        let record = Consumed {
            offset: 7,
            key: Some(b"{\"id\":42}".to_vec()),
            payload: Some(b"secret row".to_vec()),
            headers: vec![("h".into(), b"v".to_vec())],
        };
        let shown = format!("{record:?}");
        assert!(shown.contains('7') && !shown.contains("42") && !shown.contains("secret"), "{shown}");
        let options = ConsumerOptions {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            topics: vec!["t".into()],
            client_id: "sluice".into(),
            batch_max_records: 10,
            linger: Duration::from_millis(5),
            commit_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(10),
            extra: vec![("sasl.password".into(), "hunter2".into())],
            fencing: None,
        };
        assert!(!format!("{options:?}").contains("hunter2"));
    }

    #[test]
    fn a_fencing_delay_covers_the_revocation_and_the_last_request_only_for_unguarded_writes() {
        let mut options = ConsumerOptions {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            topics: vec!["t".into()],
            client_id: "c".into(),
            batch_max_records: 10,
            linger: Duration::from_millis(5),
            commit_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(10),
            extra: Vec::new(),
            fencing: None,
        };
        assert_eq!(options.fencing_delay(), Duration::ZERO);
        options.fencing = Some(Duration::from_secs(7));
        assert_eq!(options.fencing_delay(), Duration::from_secs(10 + 7) + SESSION_SLACK);
    }
}
