//! A DynamoDB Streams reader: every shard of a table's stream, parents before children, each
//! shard's records in order, from a per-shard position.
//!
//! ```text
//! DescribeStream (paged) ──▶ Lineage ──ready shards──▶ one task per shard ──▶ ShardBatch (mpsc)
//!                              ▲                         GetShardIterator / GetRecords
//!                              └── finished shards ◀───────────┘
//! ```
//!
//! - **Lineage.** A shard is read once its parent has been read to its end; a parent the
//!   stream no longer lists (trimmed after 24 h) makes its child a root. A child's batches are
//!   sent only after its parent's last one, over the one channel, so a consumer that applies
//!   batches in the order received applies a key's changes in order across a split.
//! - **Iterators** expire 15 minutes after GetShardIterator: a cursor renews its iterator
//!   from its last sequence number before that ([`ITERATOR_RENEW_AFTER`]), and once more when
//!   the service says one expired anyway.
//! - **Trimmed data** (`TrimmedDataAccessException`: the position was older than the
//!   stream's 24 h retention, typically because sluice was down) is a stop naming the table,
//!   the shard and the position: records were lost to the way back, never silently skipped.
//!
//! The service calls are behind [`StreamsApi`]: [`sdk::StreamsClient`] makes them, and the
//! unit tests replay recorded answers.

pub mod sdk;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::attr::Item;
use sluice_core::Shutdown;

/// Iterators live 15 minutes; a cursor asks for a new one after this.
pub const ITERATOR_RENEW_AFTER: Duration = Duration::from_secs(14 * 60);

/// How long a shard's reader waits after an empty answer before asking again (GetRecords
/// allows 5 calls a second per shard).
pub const EMPTY_POLL_DELAY: Duration = Duration::from_millis(250);

/// How often the stream's shards are described again to find new ones.
pub const DESCRIBE_INTERVAL: Duration = Duration::from_secs(10);

/// One shard as DescribeStream lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// The shard id.
    pub id: String,
    /// The shard it split from, if any.
    pub parent: Option<String>,
    /// The sequence number of its last record once the shard is closed; `None` while open.
    pub ending_sequence: Option<String>,
}

/// One page of DescribeStream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DescribePage {
    /// The stream's status (`ENABLING`, `ENABLED`, `DISABLING`, `DISABLED`).
    pub status: String,
    /// What the stream's records carry (`NEW_AND_OLD_IMAGES` is what the way back needs).
    pub view_type: String,
    /// This page's shards.
    pub shards: Vec<Shard>,
    /// Where the next page starts (`ExclusiveStartShardId`); `None` on the last page.
    pub last_evaluated_shard: Option<String>,
}

/// Where a shard's reading starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardStart {
    /// The oldest record the stream still holds.
    TrimHorizon,
    /// After this sequence number (the last record applied).
    After(String),
}

/// The kind of change a stream record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordEvent {
    /// A new item.
    Insert,
    /// An item changed.
    Modify,
    /// An item deleted (by a client, or by TTL).
    Remove,
}

/// One stream record. Its `Debug` shows no attribute values.
#[derive(Clone, PartialEq)]
pub struct StreamRecord {
    /// Insert, modify or remove.
    pub event: RecordEvent,
    /// The record's sequence number in its shard (a decimal string; order within a shard).
    pub sequence_number: String,
    /// The item's key attributes.
    pub keys: Item,
    /// The item after the change (`INSERT`, `MODIFY`).
    pub new_image: Option<Item>,
    /// The item before the change (`MODIFY`, `REMOVE`).
    pub old_image: Option<Item>,
    /// When the change was made, seconds since the epoch (the service's approximation).
    pub created_at: Option<f64>,
    /// True when DynamoDB's TTL removed the item (the record's user identity is the service).
    pub by_ttl: bool,
    /// An attribute of a type sluice does not map (a binary set), left out of the images: the
    /// consumer dead-letters such a record rather than apply part of it.
    pub unsupported: Option<String>,
}

impl std::fmt::Debug for StreamRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRecord")
            .field("event", &self.event)
            .field("sequence_number", &self.sequence_number)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("new_image", &self.new_image.as_ref().map(|i| i.len()))
            .field("old_image", &self.old_image.as_ref().map(|i| i.len()))
            .field("by_ttl", &self.by_ttl)
            .field("unsupported", &self.unsupported)
            .finish()
    }
}

/// One page of GetRecords.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecordsPage {
    /// The records, in the shard's order.
    pub records: Vec<StreamRecord>,
    /// The iterator for the next page; `None` once a closed shard has been read to its end.
    pub next_iterator: Option<String>,
}

/// A stream request failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    /// The position is older than what the stream still holds: records were lost.
    #[error(
        "DynamoDB Streams of table {table}: shard {shard} no longer holds the records after {position} \
         (TrimmedDataAccessException: older than the stream's 24 h retention, most likely because \
         sluice was stopped longer than that); the way back has lost changes and cannot go on: \
         compare the stores with `sluice verify` and repair before starting it again"
    )]
    Trimmed {
        /// The DynamoDB table.
        table: String,
        /// The shard.
        shard: String,
        /// The last position read (`TRIM_HORIZON` when none).
        position: String,
    },
    /// The iterator was older than 15 minutes.
    #[error("the shard iterator expired")]
    ExpiredIterator,
    /// Any other failure, classified.
    #[error(transparent)]
    Request(#[from] crate::error::DynamoError),
}

impl StreamsError {
    /// True when trying again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StreamsError::Request(e) => e.is_transient(),
            StreamsError::ExpiredIterator => true,
            StreamsError::Trimmed { .. } => false,
        }
    }
}

/// The four DynamoDB Streams calls the reader makes.
pub trait StreamsApi: Send + Sync + 'static {
    /// One page of DescribeStream, starting after `start_after`.
    fn describe(
        &self,
        stream_arn: &str,
        start_after: Option<&str>,
    ) -> impl Future<Output = Result<DescribePage, StreamsError>> + Send;
    /// GetShardIterator from `start`.
    fn iterator(
        &self,
        stream_arn: &str,
        shard: &str,
        start: &ShardStart,
    ) -> impl Future<Output = Result<String, StreamsError>> + Send;
    /// GetRecords with `iterator`.
    fn records(&self, iterator: &str) -> impl Future<Output = Result<RecordsPage, StreamsError>> + Send;
}

/// Every shard of the stream: all DescribeStream pages.
pub async fn describe_all<A: StreamsApi>(
    api: &A,
    stream_arn: &str,
) -> Result<(DescribePage, Vec<Shard>), StreamsError> {
    let mut shards = Vec::new();
    let mut start_after: Option<String> = None;
    loop {
        let page = api.describe(stream_arn, start_after.as_deref()).await?;
        shards.extend(page.shards.iter().cloned());
        match &page.last_evaluated_shard {
            Some(last) if start_after.as_deref() != Some(last.as_str()) => start_after = Some(last.clone()),
            _ => return Ok((DescribePage { shards: Vec::new(), ..page }, shards)),
        }
    }
}

/// Which shards may be read: parents first.
#[derive(Debug, Default)]
pub struct Lineage {
    shards: BTreeMap<String, Shard>,
    started: BTreeSet<String>,
    finished: BTreeSet<String>,
}

impl Lineage {
    /// A lineage with these shards already read to their end (from the checkpoint).
    pub fn with_finished(finished: impl IntoIterator<Item = String>) -> Self {
        Lineage { finished: finished.into_iter().collect(), ..Lineage::default() }
    }

    /// Takes in the shards a DescribeStream listed; shards no longer listed (trimmed) are
    /// forgotten, so their children become roots.
    pub fn update(&mut self, shards: Vec<Shard>) {
        self.shards = shards.into_iter().map(|s| (s.id.clone(), s)).collect();
    }

    /// Shards to start now, each returned once: not started, not finished, and whose parent
    /// is finished or not listed.
    pub fn take_ready(&mut self) -> Vec<Shard> {
        let ready: Vec<Shard> = self
            .shards
            .values()
            .filter(|s| !self.started.contains(&s.id) && !self.finished.contains(&s.id))
            .filter(|s| match &s.parent {
                None => true,
                Some(parent) => self.finished.contains(parent) || !self.shards.contains_key(parent),
            })
            .cloned()
            .collect();
        self.started.extend(ready.iter().map(|s| s.id.clone()));
        ready
    }

    /// A shard was read to its end.
    pub fn finish(&mut self, shard: &str) {
        self.finished.insert(shard.to_owned());
    }

    /// Shards started and not yet finished.
    pub fn reading(&self) -> usize {
        self.started.difference(&self.finished).count()
    }
}

/// What one read of a shard gave.
#[derive(Debug, Default, PartialEq)]
pub struct ShardRead {
    /// The records, in order (possibly none).
    pub records: Vec<StreamRecord>,
    /// True once the shard is closed and read to its end: no record follows.
    pub finished: bool,
}

/// A shard's reading position and its iterator.
#[derive(Debug)]
pub struct ShardCursor {
    table: String,
    stream_arn: String,
    shard: String,
    position: ShardStart,
    iterator: Option<(String, Instant)>,
}

impl ShardCursor {
    /// A cursor on `shard` of `stream_arn` (the stream of `table`) from `position`.
    pub fn new(table: &str, stream_arn: &str, shard: &str, position: ShardStart) -> Self {
        ShardCursor {
            table: table.to_owned(),
            stream_arn: stream_arn.to_owned(),
            shard: shard.to_owned(),
            position,
            iterator: None,
        }
    }

    /// The position after the records read so far.
    pub fn position(&self) -> &ShardStart {
        &self.position
    }

    /// True when the iterator must be renewed before it is used at `now`.
    pub fn needs_iterator(&self, now: Instant) -> bool {
        match &self.iterator {
            None => true,
            Some((_, obtained)) => now.saturating_duration_since(*obtained) >= ITERATOR_RENEW_AFTER,
        }
    }

    /// Reads the next page: renews the iterator when it is old or the service says it
    /// expired (once per call), and names the shard and position when the data was trimmed.
    pub async fn read<A: StreamsApi>(&mut self, api: &A) -> Result<ShardRead, StreamsError> {
        let mut renewed = false;
        loop {
            let now = Instant::now();
            if self.needs_iterator(now) {
                let iterator = api
                    .iterator(&self.stream_arn, &self.shard, &self.position)
                    .await
                    .map_err(|e| self.named(e))?;
                self.iterator = Some((iterator, now));
                renewed = true;
            }
            let (iterator, _) = self.iterator.clone().expect("an iterator was just obtained");
            match api.records(&iterator).await {
                Ok(page) => {
                    if let Some(last) = page.records.last() {
                        self.position = ShardStart::After(last.sequence_number.clone());
                    }
                    let finished = page.next_iterator.is_none();
                    // A page's next iterator is new: it lives 15 minutes from now.
                    self.iterator = page.next_iterator.map(|next| (next, Instant::now()));
                    return Ok(ShardRead { records: page.records, finished });
                }
                Err(StreamsError::ExpiredIterator) if !renewed => {
                    self.iterator = None;
                    renewed = true;
                }
                Err(e) => {
                    if e.is_transient() {
                        // The next call starts from the last record read, with a new iterator.
                        self.iterator = None;
                    }
                    return Err(self.named(e));
                }
            }
        }
    }

    fn named(&self, error: StreamsError) -> StreamsError {
        match error {
            StreamsError::Trimmed { .. } => StreamsError::Trimmed {
                table: self.table.clone(),
                shard: self.shard.clone(),
                position: match &self.position {
                    ShardStart::TrimHorizon => "TRIM_HORIZON".into(),
                    ShardStart::After(sequence) => format!("sequence number {sequence}"),
                },
            },
            other => other,
        }
    }
}

/// Records of one shard, as read (or the shard's end).
#[derive(Debug)]
pub struct ShardBatch {
    /// The shard.
    pub shard: String,
    /// Its records, in order.
    pub records: Vec<StreamRecord>,
    /// True on the shard's last batch: it is closed and read to its end.
    pub finished: bool,
    /// On a batch without records: the shard was found at its end by a read sent at this
    /// time, so every record written before it has been sent (sent at most once a second).
    pub read_to: Option<std::time::SystemTime>,
}

/// How often a shard found at its end says so ([`ShardBatch::read_to`]).
pub const READ_TO_INTERVAL: Duration = Duration::from_secs(1);

/// Reads a table's stream until shutdown or a fatal error.
pub struct StreamReader<A> {
    api: Arc<A>,
    table: String,
    stream_arn: String,
    /// Each shard's position after its last applied record.
    positions: BTreeMap<String, String>,
    lineage: Lineage,
    retry: sluice_core::RetryPolicy,
}

impl<A: StreamsApi> StreamReader<A> {
    /// A reader of `stream_arn` (the stream of `table`) resuming each shard after its
    /// position in `positions`, with the shards in `finished` already done.
    pub fn new(
        api: Arc<A>,
        table: &str,
        stream_arn: &str,
        positions: BTreeMap<String, String>,
        finished: impl IntoIterator<Item = String>,
        retry: sluice_core::RetryPolicy,
    ) -> Self {
        StreamReader {
            api,
            table: table.to_owned(),
            stream_arn: stream_arn.to_owned(),
            positions,
            lineage: Lineage::with_finished(finished),
            retry,
        }
    }

    /// Sends every shard's records to `out`, a child's after its parent's last, until
    /// `shutdown` or an error that retrying under the policy does not cure.
    pub async fn run(
        mut self,
        out: mpsc::Sender<ShardBatch>,
        mut shutdown: Shutdown,
    ) -> Result<(), StreamsError> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut describe_backoff = sluice_core::Backoff::new(self.retry);
        let mut next_describe = Instant::now();
        loop {
            if Instant::now() >= next_describe {
                match describe_all(self.api.as_ref(), &self.stream_arn).await {
                    Ok((_, shards)) => {
                        describe_backoff.reset();
                        self.lineage.update(shards);
                        for shard in self.lineage.take_ready() {
                            let start = match self.positions.remove(&shard.id) {
                                Some(sequence) => ShardStart::After(sequence),
                                None => ShardStart::TrimHorizon,
                            };
                            let cursor = ShardCursor::new(&self.table, &self.stream_arn, &shard.id, start);
                            tasks.spawn(read_shard(
                                Arc::clone(&self.api),
                                cursor,
                                out.clone(),
                                self.retry,
                                shutdown.clone(),
                            ));
                        }
                        next_describe = Instant::now() + DESCRIBE_INTERVAL;
                    }
                    Err(e) if e.is_transient() => match describe_backoff.next_delay() {
                        Some(delay) => {
                            tracing::warn!(table = %self.table, error = %e, retry_in_ms = delay.as_millis() as u64, "DescribeStream failed; retrying");
                            next_describe = Instant::now() + delay;
                        }
                        None => return Err(e),
                    },
                    Err(e) => return Err(e),
                }
            }
            tokio::select! {
                _ = shutdown.requested() => break,
                done = tasks.join_next(), if !tasks.is_empty() => match done {
                    Some(Ok(Ok(Some(shard)))) => {
                        tracing::info!(table = %self.table, shard = %shard, "shard read to its end");
                        self.lineage.finish(&shard);
                        // Its children may be listed already: describe again at once.
                        next_describe = Instant::now();
                    }
                    Some(Ok(Ok(None))) => break, // the consumer is gone, or shutdown
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(join)) => {
                        return Err(StreamsError::Request(crate::error::DynamoError::new(
                            sluice_core::ErrorKind::Fatal,
                            &self.table,
                            format!("a shard reader failed: {join}"),
                        )))
                    }
                    None => {}
                },
                _ = tokio::time::sleep_until(next_describe.into()) => {}
            }
        }
        tasks.shutdown().await;
        Ok(())
    }
}

/// Reads one shard to its end; returns its id once finished (`None` on shutdown or when the
/// consumer is gone).
async fn read_shard<A: StreamsApi>(
    api: Arc<A>,
    mut cursor: ShardCursor,
    out: mpsc::Sender<ShardBatch>,
    retry: sluice_core::RetryPolicy,
    mut shutdown: Shutdown,
) -> Result<Option<String>, StreamsError> {
    let mut backoff = sluice_core::Backoff::new(retry);
    let mut said_read_to: Option<Instant> = None;
    loop {
        if shutdown.is_requested() {
            return Ok(None);
        }
        let asked = std::time::SystemTime::now();
        let read = tokio::select! {
            read = cursor.read(api.as_ref()) => read,
            _ = shutdown.requested() => return Ok(None),
        };
        match read {
            Ok(read) => {
                backoff.reset();
                let (empty, finished) = (read.records.is_empty(), read.finished);
                let at_end =
                    empty && !finished && said_read_to.is_none_or(|t| t.elapsed() >= READ_TO_INTERVAL);
                if !empty || finished || at_end {
                    if at_end {
                        said_read_to = Some(Instant::now());
                    }
                    let batch = ShardBatch {
                        shard: cursor.shard.clone(),
                        records: read.records,
                        finished,
                        read_to: at_end.then_some(asked),
                    };
                    if out.send(batch).await.is_err() {
                        return Ok(None);
                    }
                }
                if finished {
                    return Ok(Some(cursor.shard.clone()));
                }
                if empty {
                    tokio::time::sleep(EMPTY_POLL_DELAY).await;
                }
            }
            Err(e) if e.is_transient() => match backoff.next_delay() {
                Some(delay) => {
                    tracing::warn!(shard = %cursor.shard, error = %e, retry_in_ms = delay.as_millis() as u64, "GetRecords failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
