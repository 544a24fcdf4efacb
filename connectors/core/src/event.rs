//! The change events every source produces and every target consumes.
//!
//! Positions: a change is identified by the commit LSN of its transaction and its ordinal in
//! that transaction. Commit LSNs are the only LSNs that increase in commit order (changes of
//! concurrent transactions interleave in the WAL), so `(commit_lsn, tx_ordinal)` orders every
//! change exactly as it must be applied, across restarts and replays.

use std::sync::Arc;

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::value::{Timestamp, Value};
use crate::TypeKind;

/// Where a change stands in the source's commit order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The LSN of the transaction's commit record: the order of transactions.
    pub commit_lsn: Lsn,
    /// 0 for Begin, then 1, 2, … for each change, in the order the transaction made them.
    pub tx_ordinal: u32,
}

/// How a table identifies the old row of updates and deletes (`REPLICA IDENTITY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key's columns (when there is one).
    Default,
    /// No old row at all: updates and deletes cannot be matched to a target row.
    Nothing,
    /// Every column of the old row.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// The identity from pgoutput's Relation message byte (`d`, `n`, `f`, `i`).
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }

    /// The name `pg_class.relreplident` values stand for, for messages and status.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "default",
            ReplicaIdentity::Nothing => "nothing",
            ReplicaIdentity::Full => "full",
            ReplicaIdentity::Index => "index",
        }
    }
}

/// A published table as the stream describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Relation {
    /// The table's OID: how changes refer to this relation.
    pub oid: u32,
    /// The schema.
    pub namespace: String,
    /// The table's name.
    pub name: String,
    /// What the old row of updates and deletes carries.
    pub replica_identity: ReplicaIdentity,
    /// The columns, in table order: a row's values come in this order.
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.table`, for messages and mappings.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// True when updates and deletes carry enough of the old row to find the target row.
    pub fn has_identity(&self) -> bool {
        self.replica_identity == ReplicaIdentity::Full || self.columns.iter().any(|c| c.is_key)
    }
}

/// One column of a published table.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// The column's name.
    pub name: String,
    /// The OID of its type (`pg_type.oid`).
    pub type_oid: u32,
    /// The type modifier (`atttypmod`: length, precision), -1 when there is none.
    pub type_modifier: i32,
    /// Part of the replica identity.
    pub is_key: bool,
    /// How its values decode.
    pub kind: TypeKind,
}

impl Column {
    /// A value of this column from its text form (`None` is NULL), as the queries that read
    /// tables directly receive it; the error names the column and the type.
    pub fn decode_text(&self, text: Option<&str>) -> Result<Value, String> {
        match text {
            None => Ok(Value::Null),
            Some(text) => self.kind.decode_text(self.type_oid, text).map_err(|e| {
                format!("column {}: cannot decode a {} value: {}", self.name, e.type_name, e.reason)
            }),
        }
    }
}

/// The new row of an update.
#[derive(Clone, Debug, PartialEq)]
pub enum NewRow {
    /// Every column's new value.
    Full(Vec<Value>),
    /// Some TOASTed columns were not changed and not sent: `None` at their places.
    /// A target must keep what it stored for them.
    Partial(Vec<Option<Value>>),
}

/// The old row of an update or delete.
#[derive(Clone, Debug, PartialEq)]
pub enum OldRow {
    /// Only the replica identity columns hold values; the others are `Null`.
    Key(Vec<Value>),
    /// Every column (REPLICA IDENTITY FULL).
    Full(Vec<Value>),
}

impl OldRow {
    /// The values of the old row, whichever kind it is.
    pub fn values(&self) -> &[Value] {
        match self {
            OldRow::Key(v) | OldRow::Full(v) => v,
        }
    }
}

/// One change, in commit order.
#[derive(Clone, Debug, PartialEq)]
pub enum ChangeEvent {
    /// A transaction starts.
    Begin {
        /// Its commit LSN, ordinal 0.
        position: Position,
        /// The transaction id.
        xid: u32,
        /// When the transaction committed.
        commit_time: Timestamp,
    },
    /// A transaction ends: every change before it, back to its Begin, is complete.
    Commit {
        /// The position of the commit (ordinal after the last change).
        position: Position,
        /// The end of the commit record: the position a slot may confirm once it is applied.
        end_lsn: Lsn,
        /// When the transaction committed.
        commit_time: Timestamp,
    },
    /// The shape of a table, sent before its first change and after every schema change.
    Relation(Arc<Relation>),
    /// A new row. `snapshot`: not a change but a row a backfill read from the table (brought up
    /// to date with the changes made while it was read); targets write it like an insert, and
    /// records name it `read`.
    Insert {
        /// Where the change stands.
        position: Position,
        /// Its table.
        relation: Arc<Relation>,
        /// The row, in the relation's column order.
        new: Vec<Value>,
        /// True when a backfill read the row (see above).
        snapshot: bool,
    },
    /// A changed row.
    Update {
        /// Where the change stands.
        position: Position,
        /// Its table.
        relation: Arc<Relation>,
        /// The old row, when the replica identity sends it (a key change, or REPLICA IDENTITY FULL).
        old: Option<OldRow>,
        /// The new row.
        new: NewRow,
    },
    /// A deleted row.
    Delete {
        /// Where the change stands.
        position: Position,
        /// Its table.
        relation: Arc<Relation>,
        /// The old row: its identity columns, or every column.
        old: OldRow,
    },
    /// Tables emptied by TRUNCATE.
    Truncate {
        /// Where the change stands.
        position: Position,
        /// The tables, in the order the statement named them.
        relations: Vec<Arc<Relation>>,
        /// `TRUNCATE … CASCADE`.
        cascade: bool,
        /// `TRUNCATE … RESTART IDENTITY`.
        restart_identity: bool,
    },
    /// A `pg_logical_emit_message` message. Non-transactional ones have no Begin/Commit around them.
    Message {
        /// Where the message stands (transactional ones inside their transaction).
        position: Position,
        /// Sent inside a transaction (true) or at once (false).
        transactional: bool,
        /// The prefix the message was emitted with.
        prefix: String,
        /// The message's bytes.
        content: Bytes,
    },
}

impl ChangeEvent {
    /// An insert, update or delete.
    pub fn is_row_change(&self) -> bool {
        matches!(self, ChangeEvent::Insert { .. } | ChangeEvent::Update { .. } | ChangeEvent::Delete { .. })
    }

    /// Where the event stands; none for a Relation, which describes and does not change.
    pub fn position(&self) -> Option<Position> {
        match self {
            ChangeEvent::Relation(_) => None,
            ChangeEvent::Begin { position, .. }
            | ChangeEvent::Commit { position, .. }
            | ChangeEvent::Insert { position, .. }
            | ChangeEvent::Update { position, .. }
            | ChangeEvent::Delete { position, .. }
            | ChangeEvent::Truncate { position, .. }
            | ChangeEvent::Message { position, .. } => Some(*position),
        }
    }
}

/// Events handed to the target together, in order.
#[derive(Debug, Default)]
pub struct EventBatch {
    /// The events, in commit order.
    pub events: Vec<ChangeEvent>,
    /// The source position that may be confirmed once this batch and every batch before it are
    /// durable: the end LSN of the last transaction the batch completes. `None` when the batch
    /// completes no transaction (a slice of a large one).
    pub ack_lsn: Option<Lsn>,
    /// Changes whose commit LSN is above this were never delivered before, neither in an
    /// earlier session of this process nor by an earlier process on the slot: every earlier
    /// session on the slot had ended when this one started streaming, and this is the server's
    /// WAL insert position at that moment. Changes at or below it may be redeliveries. Targets
    /// that are the only writer of their items may skip reading stored versions above it.
    /// `None` when the source knows no such position (a polled table): any change may be a
    /// redelivery.
    pub redelivery_horizon: Option<Lsn>,
    /// Commit time (microseconds since 2000-01-01 UTC, Postgres' epoch) of the last
    /// transaction this batch completes, or the time a heartbeat in it was emitted.
    pub commit_time: Option<i64>,
    /// The partition the batch was read from, when the source is a partitioned log (the
    /// Kafka source); `None` for a database's stream, which is in commit order as a whole.
    pub slice: Option<LogSlice>,
}

/// Where a batch read from one partition of a partitioned log comes from (the Kafka source).
/// Positions are in order within one partition only (a key lives in one partition), so a
/// target that skips what it applied keeps one checkpoint per partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSlice {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The assignment it was read under: a new one means another process may have applied
    /// from the partition meanwhile, so a target reads its checkpoint for it again.
    pub generation: u64,
    /// The offset after the batch's last record.
    pub next_offset: i64,
}

impl std::fmt::Display for Position {
    /// `commit_lsn/tx_ordinal`, as records, dead-letter entries and event logs name a change.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.commit_lsn, self.tx_ordinal)
    }
}
