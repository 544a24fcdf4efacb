//! From pgoutput messages to change events: keeps the relation cache, numbers the changes of a
//! transaction and types every column value.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::binary::DecodeBinary;
use crate::pgoutput::{ColumnData, LogicalMessage, OldTuple, RelationBody, TupleData};
use crate::types::TypeRegistry;
use sluice_core::event::{ChangeEvent, Column, NewRow, OldRow, Position, Relation, ReplicaIdentity};
use sluice_core::lsn::Lsn;
use sluice_core::value::{Timestamp, Value};

/// Something in the stream contradicts what came before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[expect(missing_docs, reason = "each variant's message says what it is")]
pub enum StreamError {
    #[error("change for relation OID {oid} arrived before its Relation message")]
    UnknownRelation { oid: u32 },
    #[error("change outside a transaction")]
    NoTransaction,
    #[error("Begin inside a transaction")]
    NestedBegin,
    #[error("table {table}: row has {got} columns, relation has {expected}")]
    ColumnCount { table: String, got: usize, expected: usize },
    #[error("table {table} column {column}: value is not valid UTF-8 text")]
    NotUtf8 { table: String, column: String },
    #[error("table {table} column {column}: unchanged TOAST marker where a whole row is required")]
    UnexpectedToastMarker { table: String, column: String },
    #[error("relation OID {oid}: unknown replica identity {identity:?}")]
    ReplicaIdentity { oid: u32, identity: char },
}

#[derive(Debug)]
struct OpenTransaction {
    commit_lsn: Lsn,
    ordinal: u32,
    /// Its Origin message named an origin whose changes are dropped.
    dropped: bool,
}

/// Turns the pgoutput message sequence of one replication session into change events.
#[derive(Debug)]
pub struct Decoder {
    relations: HashMap<u32, Arc<Relation>>,
    /// The types the stream described (Type messages), and the built-in ones.
    pub types: TypeRegistry,
    transaction: Option<OpenTransaction>,
    /// Values that did not decode as their type and travel as text instead.
    pub fallback_count: u64,
    /// Replication origins whose transactions' changes are dropped (sluice's own writes in
    /// the other direction): their Begin and Commit still pass, so the position advances.
    drop_origins: Vec<String>,
    /// Transactions dropped for their origin.
    pub dropped_transactions: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            relations: HashMap::new(),
            types: TypeRegistry::new(),
            transaction: None,
            fallback_count: 0,
            drop_origins: Vec::new(),
            dropped_transactions: 0,
        }
    }
}

impl Decoder {
    /// Drops the changes of transactions that carry one of these replication origins.
    pub fn dropping_origins(mut self, origins: Vec<String>) -> Self {
        self.drop_origins = origins;
        self
    }

    /// Between a Begin and its Commit.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// Forgets a transaction cut short by a lost connection.
    pub fn reset_transaction(&mut self) {
        self.transaction = None;
    }

    /// The table with this OID, as its last Relation message described it.
    pub fn relation(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&oid)
    }

    /// Starts a transaction whose commit LSN is known (Begin, or the replay of a streamed one).
    pub fn begin(&mut self, commit_lsn: Lsn, xid: u32, commit_time: i64) -> Result<ChangeEvent, StreamError> {
        if self.transaction.is_some() {
            return Err(StreamError::NestedBegin);
        }
        self.transaction = Some(OpenTransaction { commit_lsn, ordinal: 0, dropped: false });
        Ok(ChangeEvent::Begin {
            position: Position { commit_lsn, tx_ordinal: 0 },
            xid,
            commit_time: Timestamp(commit_time),
        })
    }

    /// Ends the open transaction.
    pub fn commit(&mut self, end_lsn: Lsn, commit_time: i64) -> Result<ChangeEvent, StreamError> {
        let position = self.next_position()?;
        self.transaction = None;
        Ok(ChangeEvent::Commit { position, end_lsn, commit_time: Timestamp(commit_time) })
    }

    fn next_position(&mut self) -> Result<Position, StreamError> {
        let tx = self.transaction.as_mut().ok_or(StreamError::NoTransaction)?;
        tx.ordinal += 1;
        Ok(Position { commit_lsn: tx.commit_lsn, tx_ordinal: tx.ordinal })
    }

    /// Decodes a message that belongs to a transaction (or a non-transactional logical message).
    /// Begin, Commit and the Stream* messages are handled by the caller.
    pub fn change(&mut self, message: LogicalMessage) -> Result<Option<ChangeEvent>, StreamError> {
        let dropped = self.transaction.as_ref().is_some_and(|t| t.dropped);
        match &message {
            LogicalMessage::Origin { name, .. } => {
                if let Some(tx) = self.transaction.as_mut().filter(|_| self.drop_origins.contains(name)) {
                    if !tx.dropped {
                        tx.dropped = true;
                        self.dropped_transactions += 1;
                    }
                }
                return Ok(None);
            }
            LogicalMessage::Insert { .. }
            | LogicalMessage::Update { .. }
            | LogicalMessage::Delete { .. }
            | LogicalMessage::Truncate { .. }
            | LogicalMessage::Message { transactional: true, .. }
                if dropped =>
            {
                return Ok(None)
            }
            _ => {}
        }
        Ok(Some(match message {
            LogicalMessage::Relation(body) => ChangeEvent::Relation(self.add_relation(body)?),
            LogicalMessage::Insert { oid, new, .. } => {
                let relation = self.lookup(oid)?;
                let new = full_row(&relation, new, &mut self.fallback_count)?;
                ChangeEvent::Insert { position: self.next_position()?, relation, new, snapshot: false }
            }
            LogicalMessage::Update { oid, old, new, .. } => {
                let relation = self.lookup(oid)?;
                let old = old.map(|old| old_row(&relation, old, &mut self.fallback_count)).transpose()?;
                let new = new_row(&relation, new, &mut self.fallback_count)?;
                ChangeEvent::Update { position: self.next_position()?, relation, old, new }
            }
            LogicalMessage::Delete { oid, old, .. } => {
                let relation = self.lookup(oid)?;
                let old = old_row(&relation, old, &mut self.fallback_count)?;
                ChangeEvent::Delete { position: self.next_position()?, relation, old }
            }
            LogicalMessage::Truncate { options, oids, .. } => {
                let relations = oids.iter().map(|&oid| self.lookup(oid)).collect::<Result<_, _>>()?;
                ChangeEvent::Truncate {
                    position: self.next_position()?,
                    relations,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                }
            }
            LogicalMessage::Message { transactional, lsn, prefix, content, .. } => {
                let position = if transactional && self.transaction.is_some() {
                    self.next_position()?
                } else {
                    Position { commit_lsn: lsn, tx_ordinal: 0 }
                };
                ChangeEvent::Message { position, transactional, prefix, content }
            }
            LogicalMessage::Type { .. } | LogicalMessage::Origin { .. } => return Ok(None),
            LogicalMessage::Begin { .. }
            | LogicalMessage::Commit { .. }
            | LogicalMessage::StreamStart { .. }
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit { .. }
            | LogicalMessage::StreamAbort { .. } => return Err(StreamError::NoTransaction),
        }))
    }

    fn lookup(&self, oid: u32) -> Result<Arc<Relation>, StreamError> {
        self.relations.get(&oid).cloned().ok_or(StreamError::UnknownRelation { oid })
    }

    fn add_relation(&mut self, body: RelationBody) -> Result<Arc<Relation>, StreamError> {
        let replica_identity = ReplicaIdentity::from_byte(body.replica_identity)
            .ok_or(StreamError::ReplicaIdentity { oid: body.oid, identity: body.replica_identity as char })?;
        let columns = body
            .columns
            .into_iter()
            .map(|c| Column {
                kind: self.types.resolve(c.type_oid),
                name: c.name,
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                is_key: c.flags & 1 != 0,
            })
            .collect();
        let relation = Arc::new(Relation {
            oid: body.oid,
            namespace: body.namespace,
            name: body.name,
            replica_identity,
            columns,
        });
        self.relations.insert(relation.oid, Arc::clone(&relation));
        Ok(relation)
    }
}

fn check_width(relation: &Relation, tuple: &TupleData) -> Result<(), StreamError> {
    if tuple.0.len() != relation.columns.len() {
        return Err(StreamError::ColumnCount {
            table: relation.qualified_name(),
            got: tuple.0.len(),
            expected: relation.columns.len(),
        });
    }
    Ok(())
}

fn decode_column(
    relation: &Relation,
    column: &Column,
    data: ColumnData,
    fallbacks: &mut u64,
) -> Result<Option<Value>, StreamError> {
    Ok(Some(match data {
        ColumnData::Null => Value::Null,
        ColumnData::UnchangedToast => return Ok(None),
        ColumnData::Text(bytes) => decode_text(relation, column, &bytes, fallbacks)?,
        ColumnData::Binary(bytes) => decode_binary(relation, column, &bytes, fallbacks),
    }))
}

fn decode_text(
    relation: &Relation,
    column: &Column,
    bytes: &Bytes,
    fallbacks: &mut u64,
) -> Result<Value, StreamError> {
    let text = std::str::from_utf8(bytes).map_err(|_| StreamError::NotUtf8 {
        table: relation.qualified_name(),
        column: column.name.clone(),
    })?;
    match column.kind.decode_text(column.type_oid, text) {
        Ok(value) => Ok(value),
        Err(error) => {
            // Never lose the value: pass it on as text with its type, and say so (without the value).
            *fallbacks += 1;
            tracing::warn!(table = %relation.qualified_name(), column = %column.name, type_oid = column.type_oid, %error,
                "value did not decode as its type; passing it on as text");
            Ok(Value::Unknown { type_oid: column.type_oid, text: text.to_owned() })
        }
    }
}

fn decode_binary(relation: &Relation, column: &Column, bytes: &Bytes, fallbacks: &mut u64) -> Value {
    column.kind.decode_binary(column.type_oid, bytes).unwrap_or_else(|error| {
        *fallbacks += 1;
        tracing::warn!(table = %relation.qualified_name(), column = %column.name, type_oid = column.type_oid, %error,
            "binary value did not decode as its type; passing its bytes on");
        Value::UnknownBinary { type_oid: column.type_oid, bytes: bytes.to_vec() }
    })
}

fn full_row(relation: &Relation, tuple: TupleData, fallbacks: &mut u64) -> Result<Vec<Value>, StreamError> {
    check_width(relation, &tuple)?;
    relation
        .columns
        .iter()
        .zip(tuple.0)
        .map(|(column, data)| {
            decode_column(relation, column, data, fallbacks)?.ok_or_else(|| {
                StreamError::UnexpectedToastMarker {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                }
            })
        })
        .collect()
}

fn new_row(relation: &Relation, tuple: TupleData, fallbacks: &mut u64) -> Result<NewRow, StreamError> {
    check_width(relation, &tuple)?;
    let values: Vec<Option<Value>> = relation
        .columns
        .iter()
        .zip(tuple.0)
        .map(|(column, data)| decode_column(relation, column, data, fallbacks))
        .collect::<Result<_, _>>()?;
    if values.iter().all(Option::is_some) {
        Ok(NewRow::Full(values.into_iter().flatten().collect()))
    } else {
        Ok(NewRow::Partial(values))
    }
}

fn old_row(relation: &Relation, old: OldTuple, fallbacks: &mut u64) -> Result<OldRow, StreamError> {
    // An old row can hold unchanged-TOAST markers too (FULL identity, value not rewritten);
    // they become NULL here: the old row identifies, the new row carries values.
    let decode = |tuple: TupleData, fallbacks: &mut u64| -> Result<Vec<Value>, StreamError> {
        check_width(relation, &tuple)?;
        relation
            .columns
            .iter()
            .zip(tuple.0)
            .map(
                |(column, data)| Ok(decode_column(relation, column, data, fallbacks)?.unwrap_or(Value::Null)),
            )
            .collect()
    };
    Ok(match old {
        OldTuple::Key(tuple) => OldRow::Key(decode(tuple, fallbacks)?),
        OldTuple::Full(tuple) => OldRow::Full(decode(tuple, fallbacks)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::ColumnBody;

    fn users() -> LogicalMessage {
        LogicalMessage::Relation(RelationBody {
            xid: None,
            oid: 16384,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![
                ColumnBody { flags: 1, name: "id".into(), type_oid: 20, type_modifier: -1 },
                ColumnBody { flags: 0, name: "bio".into(), type_oid: 25, type_modifier: -1 },
            ],
        })
    }

    fn text(s: &str) -> ColumnData {
        ColumnData::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn changes_are_numbered_within_their_transaction() {
        let mut decoder = Decoder::default();
        decoder.change(users()).unwrap();
        let begin = decoder.begin(Lsn(100), 7, 0).unwrap();
        assert_eq!(begin.position(), Some(Position { commit_lsn: Lsn(100), tx_ordinal: 0 }));
        let insert = decoder
            .change(LogicalMessage::Insert {
                xid: None,
                oid: 16384,
                new: TupleData(vec![text("1"), text("hi")]),
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            insert,
            ChangeEvent::Insert {
                position: Position { commit_lsn: Lsn(100), tx_ordinal: 1 },
                relation: Arc::clone(decoder.relation(16384).unwrap()),
                new: vec![Value::Int8(1), Value::Text("hi".into())],
                snapshot: false,
            }
        );
        let commit = decoder.commit(Lsn(120), 0).unwrap();
        assert_eq!(commit.position(), Some(Position { commit_lsn: Lsn(100), tx_ordinal: 2 }));
        assert!(!decoder.in_transaction());
    }

    #[test]
    fn a_transaction_of_a_dropped_origin_keeps_its_begin_and_commit_only() {
        let mut decoder = Decoder::default().dropping_origins(vec!["sluice_p_reverse".into()]);
        decoder.change(users()).unwrap();
        let insert =
            || LogicalMessage::Insert { xid: None, oid: 16384, new: TupleData(vec![text("1"), text("hi")]) };
        let origin = |name: &str| LogicalMessage::Origin { lsn: Lsn(90), name: name.into() };
        // sluice's own reverse write: dropped, but its commit still passes.
        decoder.begin(Lsn(100), 7, 0).unwrap();
        assert_eq!(decoder.change(origin("sluice_p_reverse")).unwrap(), None);
        assert_eq!(decoder.change(insert()).unwrap(), None);
        assert_eq!(
            decoder.change(users()).unwrap().map(|e| matches!(e, ChangeEvent::Relation(_))),
            Some(true)
        );
        assert!(matches!(decoder.commit(Lsn(120), 0).unwrap(), ChangeEvent::Commit { .. }));
        assert_eq!(decoder.dropped_transactions, 1);
        // Another origin (another replication tool) and no origin at all: delivered.
        for name in [Some("other_tool"), None] {
            decoder.begin(Lsn(200), 8, 0).unwrap();
            if let Some(name) = name {
                decoder.change(origin(name)).unwrap();
            }
            assert!(decoder.change(insert()).unwrap().is_some(), "{name:?}");
            decoder.commit(Lsn(220), 0).unwrap();
        }
        assert_eq!(decoder.dropped_transactions, 1);
    }

    #[test]
    fn unchanged_toast_makes_a_partial_row() {
        let mut decoder = Decoder::default();
        decoder.change(users()).unwrap();
        decoder.begin(Lsn(100), 7, 0).unwrap();
        let update = decoder
            .change(LogicalMessage::Update {
                xid: None,
                oid: 16384,
                old: None,
                new: TupleData(vec![text("1"), ColumnData::UnchangedToast]),
            })
            .unwrap()
            .unwrap();
        let ChangeEvent::Update { new, .. } = update else { panic!("expected update") };
        assert_eq!(new, NewRow::Partial(vec![Some(Value::Int8(1)), None]));
    }

    #[test]
    fn change_for_unknown_relation_is_an_error() {
        let mut decoder = Decoder::default();
        decoder.begin(Lsn(1), 1, 0).unwrap();
        let err =
            decoder.change(LogicalMessage::Insert { xid: None, oid: 5, new: TupleData(vec![]) }).unwrap_err();
        assert_eq!(err, StreamError::UnknownRelation { oid: 5 });
    }

    #[test]
    fn undecodable_value_travels_as_text() {
        let mut decoder = Decoder::default();
        decoder.change(users()).unwrap();
        decoder.begin(Lsn(100), 7, 0).unwrap();
        let insert = decoder
            .change(LogicalMessage::Insert {
                xid: None,
                oid: 16384,
                new: TupleData(vec![text("not-a-number"), ColumnData::Null]),
            })
            .unwrap()
            .unwrap();
        let ChangeEvent::Insert { new, .. } = insert else { panic!("expected insert") };
        assert_eq!(new[0], Value::Unknown { type_oid: 20, text: "not-a-number".into() });
        assert_eq!(decoder.fallback_count, 1);
    }

    #[test]
    fn row_width_mismatch_names_the_table() {
        let mut decoder = Decoder::default();
        decoder.change(users()).unwrap();
        decoder.begin(Lsn(100), 7, 0).unwrap();
        let err = decoder
            .change(LogicalMessage::Insert { xid: None, oid: 16384, new: TupleData(vec![text("1")]) })
            .unwrap_err();
        assert!(err.to_string().contains("public.users"), "{err}");
    }
}
