//! The watermark window (the DBLog technique, also behind Debezium's incremental snapshots),
//! on the pipeline's side: pure, no I/O.
//!
//! The backfill task reads a table in primary-key chunks while the stream runs. Around each
//! chunk read it writes two transactional messages into the WAL: a low watermark before the
//! read and a high one after it (`sluice.watermark`, `low|high <pipeline> <chunk> <table>`).
//! The chunk's rows reach the pipeline, over a channel, before the high watermark is written.
//!
//! The stream delivers, between the two watermarks, every change committed while the chunk was
//! read. Some of them the chunk's snapshot saw, some it did not, and the window cannot tell
//! which. So at the high watermark each chunk row is brought up to date with the window's
//! changes to its key, in stream order (an insert or a full update replaces the row, a partial
//! update — unchanged TOAST columns absent — overlays the columns it has, a delete removes
//! it). The result is emitted as inserts at the high watermark's commit LSN, right after the
//! window's own changes, each with its own ordinal after the watermark's. Replaying a change
//! the snapshot had already seen gives the same row again, so the emitted row is the key's
//! state at the high watermark either way, and every later change has a higher position: the
//! target's position guard keeps them in order. DBLog drops a chunk row that the window
//! touched instead; bringing it up to date gives the same result for full rows and keeps the
//! TOAST columns a partial update does not carry.
//!
//! A reconcile request also names keys the source no longer has: unless the window inserted
//! them again, they become deletes at the high watermark.
//!
//! A table may be read by several readers at once, each a key range of it (chunk ids are
//! `<request>.<process>.<reader>.<chunk>`): each has its own window, and a change to the
//! table is recorded in every open window of the table, since a change may move a row from one
//! range into another.
//!
//! Watermarks of other pipelines are dropped; so are windows whose high watermark never comes
//! (a reader that died between the two): a reader's new low watermark replaces its old window,
//! and one from another process (a restart) replaces every window of the table, so at most one
//! window per reader is held in memory.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use sluice_core::{ChangeEvent, EventBatch, NewRow, OldRow, Position, Relation, TableName, Value};

pub use sluice_postgres::source::WATERMARK_PREFIX;

/// One chunk read by the backfill task.
#[derive(Debug)]
pub struct Chunk {
    /// `<request>.<process>.<reader>.<chunk>`, unique within the pipeline.
    pub id: String,
    pub relation: Arc<Relation>,
    /// Indexes of the primary key's columns in `relation.columns`, in key order.
    pub primary_key: Vec<usize>,
    /// The rows read, complete.
    pub rows: Vec<Vec<Value>>,
    /// Keys a reconcile request named that the source does not have (values in key order).
    pub absent_keys: Vec<Vec<Value>>,
    /// Told once the chunk's writes are durable in the target.
    pub done: oneshot::Sender<()>,
    /// The chunk's writes durable so far: the pipeline adds each part's as it becomes
    /// durable, so that progress moves within a chunk.
    pub applied: Arc<AtomicU64>,
}

/// A watermark message's content.
#[derive(Debug, PartialEq, Eq)]
pub struct Watermark<'a> {
    pub high: bool,
    pub pipeline: &'a str,
    pub chunk: &'a str,
    pub table: &'a str,
}

impl<'a> Watermark<'a> {
    pub fn text(high: bool, pipeline: &str, chunk: &str, table: &str) -> String {
        format!("{} {pipeline} {chunk} {table}", if high { "high" } else { "low" })
    }

    pub fn parse(content: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(content).ok()?;
        let mut words = text.split(' ');
        let high = match words.next()? {
            "low" => false,
            "high" => true,
            _ => return None,
        };
        let (pipeline, chunk, table) = (words.next()?, words.next()?, words.next()?);
        words.next().is_none().then_some(Watermark { high, pipeline, chunk, table })
    }
}

/// A batch to submit, and what to tell when it is durable.
pub struct Part {
    pub batch: EventBatch,
    /// The chunk's last part: its sender, told when durable.
    pub chunk_done: Option<oneshot::Sender<()>>,
    /// A part of a chunk: its counter, and the writes to add to it when durable.
    pub chunk_applied: Option<(Arc<AtomicU64>, u64)>,
}

impl Part {
    fn of_stream(batch: EventBatch) -> Self {
        Part { batch, chunk_done: None, chunk_applied: None }
    }
}

struct Window {
    /// `schema.table`.
    table: String,
    /// The window's row changes to the table, in stream order.
    events: Vec<ChangeEvent>,
}

/// The pipeline's view of the backfill: open windows by chunk, and chunks not yet merged.
pub struct Watermarks {
    pipeline: String,
    windows: HashMap<String, Window>,
    /// Chunks received and not yet merged, with their arrival order: the backfill reads one
    /// chunk ahead, so the next chunk may arrive before the stream reaches this one's high
    /// watermark.
    chunks: HashMap<String, (u64, Chunk)>,
    arrivals: u64,
    /// sluice's own tables in the source (the backfill's progress, the pipeline's checkpoint):
    /// their changes are bookkeeping, never data, even under a publication FOR ALL TABLES.
    bookkeeping: Vec<TableName>,
    incoming: Option<mpsc::Receiver<Chunk>>,
    /// Most writes of a merged chunk in one part (`pipeline.batch_max_events`).
    part_max_events: usize,
}

impl Watermarks {
    pub fn new(pipeline: &str, incoming: Option<mpsc::Receiver<Chunk>>) -> Self {
        Watermarks {
            pipeline: pipeline.to_owned(),
            windows: HashMap::new(),
            chunks: HashMap::new(),
            arrivals: 0,
            bookkeeping: Vec::new(),
            incoming,
            part_max_events: usize::MAX,
        }
    }

    /// Splits each merged chunk into parts of at most `events` writes, each counted into the
    /// chunk's progress as it becomes durable.
    pub fn with_part_max_events(mut self, events: usize) -> Self {
        self.part_max_events = events.max(1);
        self
    }

    /// Drops the changes of one of sluice's own tables from the stream.
    pub fn ignoring(mut self, table: &TableName) -> Self {
        self.bookkeeping.push(table.clone());
        self
    }

    fn is_bookkeeping(&self, event: &ChangeEvent) -> bool {
        match event {
            ChangeEvent::Insert { relation, .. }
            | ChangeEvent::Update { relation, .. }
            | ChangeEvent::Delete { relation, .. } => self.bookkeeping.iter().any(|t| t.is(relation)),
            _ => false,
        }
    }

    /// Splits a stream batch at high watermarks, inserting each merged chunk after its
    /// window. The last part keeps the batch's acknowledgement; the others carry none.
    /// Watermark messages are consumed here.
    pub fn split(&mut self, mut batch: EventBatch) -> Vec<Part> {
        let special = batch.events.iter().any(|e| {
            matches!(e, ChangeEvent::Message { prefix, .. } if prefix == WATERMARK_PREFIX)
                || self.is_bookkeeping(e)
        });
        if !special && self.windows.is_empty() {
            return vec![Part::of_stream(batch)];
        }
        let mut parts = Vec::new();
        let mut current = Vec::with_capacity(batch.events.len());
        for event in std::mem::take(&mut batch.events) {
            if let ChangeEvent::Message { prefix, content, position, .. } = &event {
                if prefix == WATERMARK_PREFIX {
                    if let Some(merged) = self.watermark(content, *position) {
                        parts.push(Part::of_stream(EventBatch {
                            events: std::mem::take(&mut current),
                            ..EventBatch::default()
                        }));
                        parts.extend(merged);
                    }
                    continue;
                }
            }
            if self.is_bookkeeping(&event) {
                continue;
            }
            self.observe(&event);
            current.push(event);
        }
        batch.events = current;
        parts.push(Part::of_stream(batch));
        parts.retain(|p| {
            !p.batch.events.is_empty()
                || p.batch.ack_lsn.is_some()
                || p.chunk_done.is_some()
                || p.batch.commit_time.is_some()
        });
        parts
    }

    /// Records a row change in the open window of its table.
    fn observe(&mut self, event: &ChangeEvent) {
        let relation = match event {
            ChangeEvent::Insert { relation, .. }
            | ChangeEvent::Update { relation, .. }
            | ChangeEvent::Delete { relation, .. } => relation,
            _ => return,
        };
        if self.windows.is_empty() {
            return;
        }
        let table = relation.qualified_name();
        for window in self.windows.values_mut().filter(|w| w.table == table) {
            window.events.push(event.clone());
        }
    }

    /// Handles one watermark; returns the merged chunk's parts at a high watermark.
    fn watermark(&mut self, content: &[u8], position: Position) -> Option<Vec<Part>> {
        let mark = Watermark::parse(content)?;
        if mark.pipeline != self.pipeline {
            return None;
        }
        if !mark.high {
            // The reader's new window replaces its own whose high watermark never came, and a
            // new process's replaces those of the process before it.
            let (reader, process) = (reader_of(mark.chunk), process_of(mark.chunk));
            self.windows.retain(|chunk, window| {
                reader_of(chunk) != reader && (window.table != mark.table || process_of(chunk) == process)
            });
            self.windows
                .insert(mark.chunk.to_owned(), Window { table: mark.table.to_owned(), events: Vec::new() });
            return None;
        }
        let window = self.windows.remove(mark.chunk)?;
        if let Some(incoming) = &mut self.incoming {
            // The chunk was sent before its high watermark was written.
            while let Ok(chunk) = incoming.try_recv() {
                self.arrivals += 1;
                self.chunks.insert(chunk.id.clone(), (self.arrivals, chunk));
            }
        }
        let (arrival, chunk) = self.chunks.remove(mark.chunk)?;
        // Chunks of the reader that arrived before this one had their windows replaced: they
        // are never merged (their senders learn it when the chunk is dropped).
        let reader = reader_of(mark.chunk);
        self.chunks.retain(|id, (at, _)| *at > arrival || reader_of(id) != reader);
        let applied = Arc::clone(&chunk.applied);
        let (events, done) = merge(chunk, &window.events, position);
        Some(split_chunk(events, done, applied, self.part_max_events))
    }
}

/// The reader a chunk id names: all but its last part.
fn reader_of(chunk: &str) -> &str {
    chunk.rsplit_once('.').map_or(chunk, |(reader, _)| reader)
}

/// The process a chunk id names: its second part.
fn process_of(chunk: &str) -> &str {
    chunk.split('.').nth(1).unwrap_or("")
}

/// A merged chunk's writes as parts of at most `max` (one, empty, for a chunk without any),
/// the last one telling `done`.
fn split_chunk(
    events: impl ExactSizeIterator<Item = ChangeEvent>,
    done: oneshot::Sender<()>,
    applied: Arc<AtomicU64>,
    max: usize,
) -> Vec<Part> {
    let mut parts = Vec::with_capacity(events.len().div_ceil(max).max(1));
    let mut events = events.peekable();
    loop {
        let piece: Vec<ChangeEvent> = events.by_ref().take(max).collect();
        let count = piece.len() as u64;
        parts.push(Part {
            batch: EventBatch { events: piece, ..EventBatch::default() },
            chunk_done: None,
            chunk_applied: Some((Arc::clone(&applied), count)),
        });
        if events.peek().is_none() {
            break;
        }
    }
    if let Some(last) = parts.last_mut() {
        last.chunk_done = Some(done);
    }
    parts
}

/// The key of a row as comparable text: the primary key's values, by column name.
fn key_of(relation: &Relation, names: &[&str], values: &[Option<&Value>]) -> Option<String> {
    let mut key = Vec::with_capacity(names.len());
    for name in names {
        let index = relation.columns.iter().position(|c| c.name == *name)?;
        key.push((*values.get(index)?)?);
    }
    Some(sluice_core::value::key_identity(key))
}

/// The `i`th write of a chunk merged at the high watermark's `position`: each its own
/// ordinal after the watermark's, so that a position names one change exactly (consumers
/// deduplicate by it) and a chunk applied in several parts checkpoints each part past the last
/// (the Postgres target skips what is at or below its checkpoint). No other change shares the
/// watermark's transaction, and every later one has a higher commit LSN.
fn nth(position: Position, i: usize) -> Position {
    let offset = u32::try_from(i).unwrap_or(u32::MAX);
    Position { commit_lsn: position.commit_lsn, tx_ordinal: position.tx_ordinal.saturating_add(offset) }
}

/// The chunk rows brought up to date with the window, at `position` onwards, and the chunk's
/// sender.
fn merge(
    chunk: Chunk,
    window: &[ChangeEvent],
    position: Position,
) -> (Box<dyn ExactSizeIterator<Item = ChangeEvent>>, oneshot::Sender<()>) {
    let relation = Arc::clone(&chunk.relation);
    if window.is_empty() && chunk.absent_keys.is_empty() {
        // Nothing changed while the chunk was read: its rows as they are, made writes as the
        // parts take them.
        let events = chunk.rows.into_iter().enumerate().map(move |(i, new)| ChangeEvent::Insert {
            position: nth(position, i),
            relation: Arc::clone(&relation),
            new,
            snapshot: true,
        });
        return (Box::new(events), chunk.done);
    }
    let names: Vec<&str> = chunk.primary_key.iter().map(|&i| relation.columns[i].name.as_str()).collect();
    // Each key's final state: None (deleted) or the full row.
    let mut rows: Vec<(String, Option<Vec<Value>>)> =
        Vec::with_capacity(chunk.rows.len() + chunk.absent_keys.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    for row in chunk.rows {
        let key = key_of(&relation, &names, &row.iter().map(Some).collect::<Vec<_>>()).unwrap_or_default();
        index.insert(key.clone(), rows.len());
        rows.push((key, Some(row)));
    }
    for key_values in &chunk.absent_keys {
        let key = sluice_core::value::key_identity(key_values);
        index.entry(key.clone()).or_insert_with(|| {
            rows.push((key, None));
            rows.len() - 1
        });
    }
    for event in window {
        match event {
            ChangeEvent::Insert { relation: r, new, .. } => {
                if let Some(&i) =
                    key_of(r, &names, &new.iter().map(Some).collect::<Vec<_>>()).and_then(|k| index.get(&k))
                {
                    rows[i].1 = Some(aligned(r, &relation, new.iter().map(Some)));
                }
            }
            ChangeEvent::Update { relation: r, old, new, .. } => {
                let new_values: Vec<Option<&Value>> = match new {
                    NewRow::Full(values) => values.iter().map(Some).collect(),
                    NewRow::Partial(values) => values.iter().map(Option::as_ref).collect(),
                };
                let new_key = key_of(r, &names, &new_values);
                if let Some(old) = old {
                    let old_key = key_of(r, &names, &old.values().iter().map(Some).collect::<Vec<_>>());
                    if old_key != new_key {
                        if let Some(&i) = old_key.and_then(|k| index.get(&k)) {
                            rows[i].1 = None;
                        }
                    }
                }
                if let Some(&i) = new_key.and_then(|k| index.get(&k)) {
                    let updated = aligned(r, &relation, new_values.iter().copied());
                    rows[i].1 = match (rows[i].1.take(), new) {
                        (_, NewRow::Full(_)) => Some(updated),
                        (Some(mut base), NewRow::Partial(_)) => {
                            // Overlay the columns the update carries (aligned() left the absent ones Null).
                            for (column, value) in relation.columns.iter().zip(base.iter_mut()) {
                                if let Some(position) = r.columns.iter().position(|c| c.name == column.name) {
                                    if let Some(Some(v)) = new_values.get(position) {
                                        *value = (*v).clone();
                                    }
                                }
                            }
                            Some(base)
                        }
                        // A partial update of a row the chunk does not hold: the stream applies it.
                        (None, NewRow::Partial(_)) => None,
                    };
                }
            }
            ChangeEvent::Delete { relation: r, old, .. } => {
                let old_values: Vec<Option<&Value>> = old.values().iter().map(Some).collect();
                if let Some(&i) = key_of(r, &names, &old_values).and_then(|k| index.get(&k)) {
                    rows[i].1 = None;
                }
            }
            _ => {}
        }
    }
    let absent: std::collections::HashSet<String> =
        chunk.absent_keys.iter().map(sluice_core::value::key_identity).collect();
    let mut events = Vec::with_capacity(rows.len());
    for (key, row) in rows {
        match row {
            Some(values) => events.push(ChangeEvent::Insert {
                position: nth(position, events.len()),
                relation: Arc::clone(&relation),
                new: values,
                snapshot: true,
            }),
            None if absent.contains(&key) => {
                let key_values: Vec<Value> = chunk
                    .absent_keys
                    .iter()
                    .find(|k| sluice_core::value::key_identity(k.iter()) == key)
                    .cloned()
                    .unwrap_or_default();
                let mut old = vec![Value::Null; relation.columns.len()];
                for (&column, value) in chunk.primary_key.iter().zip(key_values) {
                    old[column] = value;
                }
                events.push(ChangeEvent::Delete {
                    position: nth(position, events.len()),
                    relation: Arc::clone(&relation),
                    old: OldRow::Key(old),
                });
            }
            None => {}
        }
    }
    (Box::new(events.into_iter()), chunk.done)
}

/// A row of relation `from` as the columns of `to` (by name; absent ones Null).
fn aligned<'a>(
    from: &Relation,
    to: &Relation,
    values: impl Iterator<Item = Option<&'a Value>>,
) -> Vec<Value> {
    let values: Vec<Option<&Value>> = values.collect();
    to.columns
        .iter()
        .map(|column| {
            from.columns
                .iter()
                .position(|c| c.name == column.name)
                .and_then(|i| values.get(i).copied().flatten())
                .cloned()
                .unwrap_or(Value::Null)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use sluice_core::TypeKind;
    use sluice_core::{Column, Lsn, ReplicaIdentity};

    use super::*;

    fn accounts() -> Arc<Relation> {
        let columns =
            [("id", true, TypeKind::Int8), ("name", false, TypeKind::Text), ("bio", false, TypeKind::Text)];
        Arc::new(Relation {
            oid: 1,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|(n, k, t)| Column {
                    name: (*n).into(),
                    type_oid: 0,
                    type_modifier: -1,
                    is_key: *k,
                    kind: t.clone(),
                })
                .collect(),
        })
    }

    fn at(lsn: u64, ordinal: u32) -> Position {
        Position { commit_lsn: Lsn(lsn), tx_ordinal: ordinal }
    }

    fn row(id: i64, name: &str, bio: &str) -> Vec<Value> {
        vec![Value::Int8(id), Value::Text(name.into()), Value::Text(bio.into())]
    }

    fn mark(high: bool, pipeline: &str, chunk: &str, lsn: u64) -> ChangeEvent {
        ChangeEvent::Message {
            position: at(lsn, 1),
            transactional: true,
            prefix: WATERMARK_PREFIX.into(),
            content: Watermark::text(high, pipeline, chunk, "public.accounts").into_bytes().into(),
        }
    }

    fn chunk(rows: Vec<Vec<Value>>, absent: Vec<Vec<Value>>) -> (Chunk, oneshot::Receiver<()>) {
        let (done, rx) = oneshot::channel();
        (
            Chunk {
                id: "1.1".into(),
                relation: accounts(),
                primary_key: vec![0],
                rows,
                absent_keys: absent,
                done,
                applied: Arc::default(),
            },
            rx,
        )
    }

    fn batch(events: Vec<ChangeEvent>, ack: u64) -> EventBatch {
        EventBatch { events, ack_lsn: Some(Lsn(ack)), ..EventBatch::default() }
    }

    fn inserted(part: &Part) -> Vec<(Position, Vec<Value>)> {
        part.batch
            .events
            .iter()
            .filter_map(|e| match e {
                ChangeEvent::Insert { position, new, .. } => Some((*position, new.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_merged_chunk_is_split_into_counted_parts_and_only_the_last_tells_done() {
        let (tx, rx) = mpsc::channel(4);
        let mut watermarks = Watermarks::new("p", Some(rx)).with_part_max_events(2);
        let (chunk, mut done) = chunk((1..=5).map(|i| row(i, "n", "b")).collect(), vec![]);
        let applied = Arc::clone(&chunk.applied);
        tx.try_send(chunk).unwrap();
        let parts =
            watermarks.split(batch(vec![mark(false, "p", "1.1", 100), mark(true, "p", "1.1", 130)], 140));
        let sizes: Vec<usize> = parts.iter().map(|p| p.batch.events.len()).collect();
        assert_eq!(sizes, [2, 2, 1, 0], "three parts of the chunk, then the batch's acknowledgement");
        let counted: Vec<u64> =
            parts.iter().filter_map(|p| p.chunk_applied.as_ref().map(|(_, n)| *n)).collect();
        assert_eq!(counted, [2, 2, 1]);
        assert!(parts[..2].iter().all(|p| p.chunk_done.is_none()));
        assert!(parts[2].chunk_done.is_some() && parts[3].chunk_done.is_none());
        assert_eq!(parts[3].batch.ack_lsn, Some(Lsn(140)));
        assert!(parts.iter().all(|p| p.chunk_applied.as_ref().is_none_or(|(a, _)| Arc::ptr_eq(a, &applied))));
        assert!(done.try_recv().is_err());
    }

    #[test]
    fn watermarks_parse_and_print_alike_and_garbage_is_no_watermark() {
        let text = Watermark::text(true, "orders", "7.3", "public.accounts");
        assert_eq!(
            Watermark::parse(text.as_bytes()),
            Some(Watermark { high: true, pipeline: "orders", chunk: "7.3", table: "public.accounts" })
        );
        assert_eq!(Watermark::parse(b"middle orders 7.3 public.accounts"), None);
        assert_eq!(Watermark::parse(b"low orders 7.3"), None);
    }

    #[test]
    fn the_chunk_follows_its_window_up_to_date_and_the_batch_keeps_its_acknowledgement_at_the_end() {
        let (tx, rx) = mpsc::channel(4);
        let mut watermarks = Watermarks::new("p", Some(rx));
        let relation = accounts();
        let (chunk, mut done) =
            chunk(vec![row(1, "ada", "long bio"), row(2, "bob", "b"), row(3, "cy", "c")], vec![]);
        tx.try_send(chunk).unwrap();
        let events = vec![
            mark(false, "p", "1.1", 100),
            // A partial update (bio unchanged, not sent) of key 1; a delete of key 2; a change
            // to a key outside the chunk.
            ChangeEvent::Update {
                position: at(110, 1),
                relation: Arc::clone(&relation),
                old: None,
                new: NewRow::Partial(vec![Some(Value::Int8(1)), Some(Value::Text("ada l.".into())), None]),
            },
            ChangeEvent::Delete {
                position: at(120, 1),
                relation: Arc::clone(&relation),
                old: OldRow::Key(vec![Value::Int8(2), Value::Null, Value::Null]),
            },
            ChangeEvent::Insert {
                position: at(125, 1),
                relation: Arc::clone(&relation),
                new: row(9, "new", "n"),
                snapshot: false,
            },
            mark(false, "other", "5.5", 126),
            mark(true, "p", "1.1", 130),
            ChangeEvent::Update {
                position: at(140, 1),
                relation: Arc::clone(&relation),
                old: None,
                new: NewRow::Full(row(3, "cy 2", "c")),
            },
        ];
        let parts = watermarks.split(batch(events, 150));
        assert_eq!(parts.len(), 3, "window, chunk, rest");
        assert_eq!(parts[0].batch.events.len(), 3, "the window's changes, watermarks consumed");
        assert_eq!(parts[0].batch.ack_lsn, None);
        let merged = inserted(&parts[1]);
        assert_eq!(
            merged,
            vec![(at(130, 1), row(1, "ada l.", "long bio")), (at(130, 2), row(3, "cy", "c"))],
            "key 2 was deleted in the window; each row its own ordinal after the watermark's"
        );
        let snapshots = |part: &Part| {
            part.batch
                .events
                .iter()
                .filter(|e| matches!(e, ChangeEvent::Insert { snapshot: true, .. }))
                .count()
        };
        assert_eq!(
            (snapshots(&parts[0]), snapshots(&parts[1])),
            (0, 2),
            "the chunk's rows are reads, the window's insert stays an insert"
        );
        assert!(parts[1].chunk_done.is_some());
        assert_eq!(parts[2].batch.events.len(), 1);
        assert_eq!(parts[2].batch.ack_lsn, Some(Lsn(150)));
        assert!(done.try_recv().is_err(), "not durable yet");
    }

    #[test]
    fn the_next_chunk_read_ahead_survives_the_merge_of_the_one_before() {
        let (tx, rx) = mpsc::channel(4);
        let mut watermarks = Watermarks::new("p", Some(rx));
        let (first, _first_done) = chunk(vec![row(1, "a", "")], vec![]);
        let (mut second, mut second_done) = chunk(vec![row(2, "b", "")], vec![]);
        second.id = "1.2".into();
        // The backfill has sent both before the stream reaches the first high watermark.
        tx.try_send(first).unwrap();
        tx.try_send(second).unwrap();
        let parts =
            watermarks.split(batch(vec![mark(false, "p", "1.1", 100), mark(true, "p", "1.1", 110)], 115));
        assert_eq!(
            inserted(parts.iter().find(|p| p.chunk_done.is_some()).unwrap()),
            vec![(at(110, 1), row(1, "a", ""))]
        );
        let parts =
            watermarks.split(batch(vec![mark(false, "p", "1.2", 120), mark(true, "p", "1.2", 130)], 135));
        let merged = parts.into_iter().find(|p| p.chunk_done.is_some()).expect("the second chunk merges");
        assert_eq!(inserted(&merged), vec![(at(130, 1), row(2, "b", ""))]);
        merged.chunk_done.unwrap().send(()).unwrap();
        assert!(second_done.try_recv().is_ok());
    }

    #[test]
    fn readers_of_one_table_keep_a_window_each_and_every_window_sees_the_tables_changes() {
        let (tx, rx) = mpsc::channel(4);
        let mut watermarks = Watermarks::new("p", Some(rx));
        let (mut low, _low_done) = chunk(vec![row(1, "a", ""), row(2, "b", "")], vec![]);
        low.id = "7.40.0.1".into();
        let (mut high, _high_done) = chunk(vec![row(50, "x", "")], vec![]);
        high.id = "7.40.1.1".into();
        tx.try_send(high).unwrap();
        tx.try_send(low).unwrap();
        let update = |id: i64, name: &str, lsn: u64| ChangeEvent::Update {
            position: at(lsn, 1),
            relation: accounts(),
            old: None,
            new: NewRow::Full(row(id, name, "")),
        };
        // Both windows open; a change to each range; the ranges close in the other order.
        let parts = watermarks.split(batch(
            vec![
                mark(false, "p", "7.40.0.1", 100),
                mark(false, "p", "7.40.1.1", 101),
                update(2, "b2", 105),
                update(50, "x2", 106),
                mark(true, "p", "7.40.1.1", 110),
                update(1, "a2", 115),
                mark(true, "p", "7.40.0.1", 120),
            ],
            130,
        ));
        let merged: Vec<_> = parts.iter().filter(|p| p.chunk_done.is_some()).map(inserted).collect();
        assert_eq!(
            merged,
            vec![
                vec![(at(110, 1), row(50, "x2", ""))],
                vec![(at(120, 1), row(1, "a2", "")), (at(120, 2), row(2, "b2", ""))],
            ],
            "each chunk brought up to date with the changes of its own window, the other's read-ahead kept"
        );
        assert!(watermarks.windows.is_empty() && watermarks.chunks.is_empty());
    }

    #[test]
    fn a_new_process_replaces_the_windows_a_dead_one_left_open() {
        let mut watermarks = Watermarks::new("p", None);
        watermarks.split(batch(
            vec![
                mark(false, "p", "7.40.0.3", 100),
                mark(false, "p", "7.40.1.3", 101),
                mark(false, "p", "8.40.0.1", 102),
            ],
            105,
        ));
        assert_eq!(watermarks.windows.len(), 3);
        // The restarted process (pid 41) resumes request 7: the dead one's windows of the table go.
        watermarks.split(batch(vec![mark(false, "p", "7.41.0.1", 110)], 115));
        let mut open: Vec<&String> = watermarks.windows.keys().collect();
        open.sort();
        assert_eq!(open, ["7.41.0.1"]);
        // A reader's next low watermark replaces its own unclosed window only.
        watermarks
            .split(batch(vec![mark(false, "p", "7.41.1.1", 120), mark(false, "p", "7.41.0.2", 121)], 125));
        let mut open: Vec<&String> = watermarks.windows.keys().collect();
        open.sort();
        assert_eq!(open, ["7.41.0.2", "7.41.1.1"]);
    }

    #[test]
    fn changes_of_the_progress_table_never_reach_the_target() {
        let mut watermarks =
            Watermarks::new("p", None).ignoring(&TableName::new("public", "sluice_backfill"));
        let progress = Arc::new(Relation { name: "sluice_backfill".into(), ..(*accounts()).clone() });
        let events = vec![
            ChangeEvent::Insert {
                position: at(100, 1),
                relation: progress,
                new: row(1, "x", ""),
                snapshot: false,
            },
            ChangeEvent::Insert {
                position: at(100, 2),
                relation: accounts(),
                new: row(2, "y", ""),
                snapshot: false,
            },
        ];
        let parts = watermarks.split(batch(events, 110));
        assert_eq!(parts.len(), 1);
        assert_eq!(inserted(&parts[0]), vec![(at(100, 2), row(2, "y", ""))]);
    }

    #[test]
    fn absent_keys_become_deletes_unless_the_window_inserts_them() {
        let (tx, rx) = mpsc::channel(4);
        let mut watermarks = Watermarks::new("p", Some(rx));
        let (chunk, _done) = chunk(vec![], vec![vec![Value::Int8(4)], vec![Value::Int8(5)]]);
        tx.try_send(chunk).unwrap();
        let events = vec![
            mark(false, "p", "1.1", 100),
            ChangeEvent::Insert {
                position: at(110, 1),
                relation: accounts(),
                new: row(5, "back", ""),
                snapshot: false,
            },
            mark(true, "p", "1.1", 130),
        ];
        let parts = watermarks.split(batch(events, 140));
        let chunk_part = parts.iter().find(|p| p.chunk_done.is_some()).unwrap();
        assert_eq!(chunk_part.batch.events.len(), 2);
        assert!(
            matches!(&chunk_part.batch.events[0], ChangeEvent::Delete { old: OldRow::Key(k), position, .. } if k[0] == Value::Int8(4) && *position == at(130, 1))
        );
        assert_eq!(inserted(chunk_part), vec![(at(130, 2), row(5, "back", ""))]);
    }

    #[test]
    fn a_high_watermark_without_its_window_or_chunk_emits_nothing() {
        let (_tx, rx) = mpsc::channel(4);
        let mut watermarks = Watermarks::new("p", Some(rx));
        // A replay after a restart: the window opened before, the chunk is gone.
        let parts =
            watermarks.split(batch(vec![mark(false, "p", "1.1", 100), mark(true, "p", "1.1", 130)], 140));
        assert_eq!(parts.len(), 1);
        assert!(parts[0].batch.events.is_empty() && parts[0].batch.ack_lsn == Some(Lsn(140)));
        assert!(watermarks.windows.is_empty());
    }
}
