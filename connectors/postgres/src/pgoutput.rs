//! The pgoutput wire format: one logical replication message per XLogData payload.
//!
//! Protocol notes (Postgres docs, "Logical Replication Message Formats"):
//! - Begin carries the transaction's *final* (commit) LSN, so every change in a v1 stream knows
//!   its commit position before the commit arrives.
//! - With protocol 2 and `streaming`, changes of a transaction still in progress arrive between
//!   Stream Start and Stream Stop, each prefixed by the xid of the (sub)transaction that made it.
//!   The decoder must know whether it is inside such a block to read that prefix.
//! - Stream Abort names the top-level xid and the aborted subtransaction; they are equal when
//!   the whole transaction rolled back.
//! - Tuple columns are `n` (NULL), `u` (unchanged TOASTed value, not sent), `t` (text) or `b` (binary).
//!
//! Parsing here is zero-copy over the frame's `Bytes`; values are typed later (`decode.rs`).

use bytes::{Buf, Bytes};

use sluice_core::lsn::Lsn;

/// One pgoutput message. Fields carry the names of the Postgres documentation's "Logical
/// Replication Message Formats"; `xid` is the (sub)transaction's, sent only inside a
/// streamed block; times are microseconds since 2000-01-01 UTC.
#[derive(Clone, Debug, PartialEq)]
#[expect(missing_docs, reason = "fields are the protocol's, documented in Postgres' message formats")]
pub enum LogicalMessage {
    /// A transaction starts; `final_lsn` is its commit LSN.
    Begin { final_lsn: Lsn, commit_time: i64, xid: u32 },
    /// A transaction commits; `end_lsn` is the end of its commit record.
    Commit { flags: u8, commit_lsn: Lsn, end_lsn: Lsn, commit_time: i64 },
    /// The changes that follow came from this replication origin.
    Origin { lsn: Lsn, name: String },
    /// A table's shape, before its first change and after every schema change.
    Relation(RelationBody),
    /// A non-built-in type's name.
    Type { xid: Option<u32>, oid: u32, namespace: String, name: String },
    /// A new row of table `oid`.
    Insert { xid: Option<u32>, oid: u32, new: TupleData },
    /// A changed row; `old` when the replica identity sends it.
    Update { xid: Option<u32>, oid: u32, old: Option<OldTuple>, new: TupleData },
    /// A deleted row.
    Delete { xid: Option<u32>, oid: u32, old: OldTuple },
    /// Tables emptied; `options` bit 1 is CASCADE, bit 2 RESTART IDENTITY.
    Truncate { xid: Option<u32>, options: u8, oids: Vec<u32> },
    /// A `pg_logical_emit_message` message.
    Message { xid: Option<u32>, transactional: bool, lsn: Lsn, prefix: String, content: Bytes },
    /// A block of an in-progress transaction's changes starts (protocol 2, `streaming`).
    StreamStart { xid: u32, first_segment: bool },
    /// The block ends.
    StreamStop,
    /// A streamed transaction commits: its spilled changes may be applied now.
    StreamCommit { xid: u32, flags: u8, commit_lsn: Lsn, end_lsn: Lsn, commit_time: i64 },
    /// A streamed transaction (`subxid == xid`) or one of its subtransactions rolled back.
    /// With `streaming = parallel` (protocol 4) the abort's LSN and time come along.
    StreamAbort { xid: u32, subxid: u32, abort: Option<(Lsn, i64)> },
}

impl LogicalMessage {
    /// The (sub)transaction xid a message inside a streamed block belongs to.
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            LogicalMessage::Relation(RelationBody { xid, .. })
            | LogicalMessage::Type { xid, .. }
            | LogicalMessage::Insert { xid, .. }
            | LogicalMessage::Update { xid, .. }
            | LogicalMessage::Delete { xid, .. }
            | LogicalMessage::Truncate { xid, .. }
            | LogicalMessage::Message { xid, .. } => *xid,
            _ => None,
        }
    }
}

/// A Relation message's body.
#[derive(Clone, Debug, PartialEq)]
pub struct RelationBody {
    /// The (sub)transaction, inside a streamed block.
    pub xid: Option<u32>,
    /// The table's OID.
    pub oid: u32,
    /// The schema.
    pub namespace: String,
    /// The table's name.
    pub name: String,
    /// `relreplident`: `d`, `n`, `f` or `i`.
    pub replica_identity: u8,
    /// The published columns, in order.
    pub columns: Vec<ColumnBody>,
}

/// One column of a Relation message.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnBody {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    /// The column's name.
    pub name: String,
    /// Its type's OID.
    pub type_oid: u32,
    /// `atttypmod`.
    pub type_modifier: i32,
}

/// The old row of an update or delete: the key columns (`K`) or the whole row (`O`, REPLICA IDENTITY FULL).
#[derive(Clone, Debug, PartialEq)]
pub enum OldTuple {
    /// The replica identity's columns only (`K`).
    Key(TupleData),
    /// The whole old row (`O`).
    Full(TupleData),
}

/// A row's columns, in the relation's order.
#[derive(Clone, Debug, PartialEq)]
pub struct TupleData(pub Vec<ColumnData>);

/// One column of a row as sent.
#[derive(Clone, Debug, PartialEq)]
pub enum ColumnData {
    /// NULL (`n`).
    Null,
    /// A TOASTed value the change did not touch, not sent (`u`).
    UnchangedToast,
    /// The value in text format (`t`).
    Text(Bytes),
    /// The value in binary format (`b`).
    Binary(Bytes),
}

/// A malformed message: what was expected where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message {tag:?}: {reason}")]
pub struct DecodeError {
    /// The message's tag byte (`B`, `I`, …).
    pub tag: char,
    /// What was wrong.
    pub reason: &'static str,
}

struct Reader {
    buf: Bytes,
    tag: char,
}

impl Reader {
    fn err(&self, reason: &'static str) -> DecodeError {
        DecodeError { tag: self.tag, reason }
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(self.err("message ends early"))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_i64())
    }
    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.need(8)?;
        Ok(Lsn(self.buf.get_u64()))
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let end =
            self.buf.iter().position(|&b| b == 0).ok_or_else(|| self.err("string without terminator"))?;
        let raw = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(raw.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn xid_if(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            self.u32().map(Some)
        } else {
            Ok(None)
        }
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.u16()? as usize;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            columns.push(match self.u8()? {
                b'n' => ColumnData::Null,
                b'u' => ColumnData::UnchangedToast,
                b't' => {
                    let len = self.u32()? as usize;
                    ColumnData::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.u32()? as usize;
                    ColumnData::Binary(self.bytes(len)?)
                }
                _ => return Err(self.err("unknown tuple column kind")),
            });
        }
        Ok(TupleData(columns))
    }
}

/// Decodes one pgoutput message. `in_stream` is true between Stream Start and Stream Stop.
pub fn parse(data: Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    let tag = *data.first().ok_or(DecodeError { tag: '?', reason: "empty message" })?;
    let mut r = Reader { buf: data.slice(1..), tag: tag as char };
    let message = match tag {
        b'B' => LogicalMessage::Begin { final_lsn: r.lsn()?, commit_time: r.i64()?, xid: r.u32()? },
        b'C' => LogicalMessage::Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
        },
        b'O' => LogicalMessage::Origin { lsn: r.lsn()?, name: r.string()? },
        b'R' => {
            let xid = r.xid_if(in_stream)?;
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let count = r.u16()? as usize;
            let mut columns = Vec::with_capacity(count);
            for _ in 0..count {
                columns.push(ColumnBody {
                    flags: r.u8()?,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            LogicalMessage::Relation(RelationBody { xid, oid, namespace, name, replica_identity, columns })
        }
        b'Y' => LogicalMessage::Type {
            xid: r.xid_if(in_stream)?,
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let xid = r.xid_if(in_stream)?;
            let oid = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.err("insert without new tuple"));
            }
            LogicalMessage::Insert { xid, oid, new: r.tuple()? }
        }
        b'U' => {
            let xid = r.xid_if(in_stream)?;
            let oid = r.u32()?;
            let (old, new) = match r.u8()? {
                b'K' => {
                    let old = OldTuple::Key(r.tuple()?);
                    (Some(old), r.expect_new_tuple()?)
                }
                b'O' => {
                    let old = OldTuple::Full(r.tuple()?);
                    (Some(old), r.expect_new_tuple()?)
                }
                b'N' => (None, r.tuple()?),
                _ => return Err(r.err("update without new tuple")),
            };
            LogicalMessage::Update { xid, oid, old, new }
        }
        b'D' => {
            let xid = r.xid_if(in_stream)?;
            let oid = r.u32()?;
            let old = match r.u8()? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                _ => return Err(r.err("delete without old tuple")),
            };
            LogicalMessage::Delete { xid, oid, old }
        }
        b'T' => {
            let xid = r.xid_if(in_stream)?;
            let count = r.u32()? as usize;
            let options = r.u8()?;
            r.need(count.saturating_mul(4))?;
            let oids = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            LogicalMessage::Truncate { xid, options, oids }
        }
        b'M' => {
            let xid = r.xid_if(in_stream)?;
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.string()?;
            let len = r.u32()? as usize;
            LogicalMessage::Message {
                xid,
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
        b'S' => LogicalMessage::StreamStart { xid: r.u32()?, first_segment: r.u8()? == 1 },
        b'E' => LogicalMessage::StreamStop,
        b'c' => LogicalMessage::StreamCommit {
            xid: r.u32()?,
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
        },
        // Protocol 4 adds the abort LSN and time after these; they are not needed here.
        b'A' => {
            let (xid, subxid) = (r.u32()?, r.u32()?);
            // Protocol 4 with `streaming = parallel` appends the abort LSN and time; the
            // message's length says which form the server sent.
            let abort = if r.buf.is_empty() { None } else { Some((r.lsn()?, r.i64()?)) };
            LogicalMessage::StreamAbort { xid, subxid, abort }
        }
        _ => return Err(r.err("unknown message type")),
    };
    Ok(message)
}

impl Reader {
    fn expect_new_tuple(&mut self) -> Result<TupleData, DecodeError> {
        if self.u8()? != b'N' {
            return Err(self.err("update without new tuple"));
        }
        self.tuple()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    /// Encodes a message the way pgoutput does, for tests.
    pub(crate) fn encode(message: &LogicalMessage) -> Bytes {
        let mut b = BytesMut::new();
        let put_str = |b: &mut BytesMut, s: &str| {
            b.put_slice(s.as_bytes());
            b.put_u8(0);
        };
        let put_tuple = |b: &mut BytesMut, t: &TupleData| {
            b.put_u16(t.0.len() as u16);
            for c in &t.0 {
                match c {
                    ColumnData::Null => b.put_u8(b'n'),
                    ColumnData::UnchangedToast => b.put_u8(b'u'),
                    ColumnData::Text(v) | ColumnData::Binary(v) => {
                        b.put_u8(if matches!(c, ColumnData::Text(_)) { b't' } else { b'b' });
                        b.put_u32(v.len() as u32);
                        b.put_slice(v);
                    }
                }
            }
        };
        let put_xid = |b: &mut BytesMut, xid: &Option<u32>| {
            if let Some(x) = xid {
                b.put_u32(*x)
            }
        };
        match message {
            LogicalMessage::Begin { final_lsn, commit_time, xid } => {
                b.put_u8(b'B');
                b.put_u64(final_lsn.0);
                b.put_i64(*commit_time);
                b.put_u32(*xid);
            }
            LogicalMessage::Commit { flags, commit_lsn, end_lsn, commit_time } => {
                b.put_u8(b'C');
                b.put_u8(*flags);
                b.put_u64(commit_lsn.0);
                b.put_u64(end_lsn.0);
                b.put_i64(*commit_time);
            }
            LogicalMessage::Relation(r) => {
                b.put_u8(b'R');
                put_xid(&mut b, &r.xid);
                b.put_u32(r.oid);
                put_str(&mut b, &r.namespace);
                put_str(&mut b, &r.name);
                b.put_u8(r.replica_identity);
                b.put_u16(r.columns.len() as u16);
                for c in &r.columns {
                    b.put_u8(c.flags);
                    put_str(&mut b, &c.name);
                    b.put_u32(c.type_oid);
                    b.put_i32(c.type_modifier);
                }
            }
            LogicalMessage::Insert { xid, oid, new } => {
                b.put_u8(b'I');
                put_xid(&mut b, xid);
                b.put_u32(*oid);
                b.put_u8(b'N');
                put_tuple(&mut b, new);
            }
            LogicalMessage::Update { xid, oid, old, new } => {
                b.put_u8(b'U');
                put_xid(&mut b, xid);
                b.put_u32(*oid);
                match old {
                    Some(OldTuple::Key(t)) => {
                        b.put_u8(b'K');
                        put_tuple(&mut b, t);
                    }
                    Some(OldTuple::Full(t)) => {
                        b.put_u8(b'O');
                        put_tuple(&mut b, t);
                    }
                    None => {}
                }
                b.put_u8(b'N');
                put_tuple(&mut b, new);
            }
            LogicalMessage::Delete { xid, oid, old } => {
                b.put_u8(b'D');
                put_xid(&mut b, xid);
                b.put_u32(*oid);
                let (kind, t) = match old {
                    OldTuple::Key(t) => (b'K', t),
                    OldTuple::Full(t) => (b'O', t),
                };
                b.put_u8(kind);
                put_tuple(&mut b, t);
            }
            LogicalMessage::StreamStart { xid, first_segment } => {
                b.put_u8(b'S');
                b.put_u32(*xid);
                b.put_u8(u8::from(*first_segment));
            }
            LogicalMessage::StreamStop => b.put_u8(b'E'),
            LogicalMessage::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_time } => {
                b.put_u8(b'c');
                b.put_u32(*xid);
                b.put_u8(*flags);
                b.put_u64(commit_lsn.0);
                b.put_u64(end_lsn.0);
                b.put_i64(*commit_time);
            }
            LogicalMessage::StreamAbort { xid, subxid, abort } => {
                b.put_u8(b'A');
                b.put_u32(*xid);
                b.put_u32(*subxid);
                if let Some((lsn, time)) = abort {
                    b.put_u64(lsn.0);
                    b.put_i64(*time);
                }
            }
            other => unimplemented!("test encoder for {other:?}"),
        }
        b.freeze()
    }

    fn column() -> impl Strategy<Value = ColumnData> {
        prop_oneof![
            Just(ColumnData::Null),
            Just(ColumnData::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| ColumnData::Text(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| ColumnData::Binary(Bytes::from(v))),
        ]
    }

    fn tuple() -> impl Strategy<Value = TupleData> {
        proptest::collection::vec(column(), 0..8).prop_map(TupleData)
    }

    fn message() -> impl Strategy<Value = LogicalMessage> {
        let xid = proptest::option::of(any::<u32>());
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(l, t, x)| LogicalMessage::Begin {
                final_lsn: Lsn(l),
                commit_time: t,
                xid: x
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(|(f, c, e, t)| {
                LogicalMessage::Commit { flags: f, commit_lsn: Lsn(c), end_lsn: Lsn(e), commit_time: t }
            }),
            (
                xid.clone(),
                any::<u32>(),
                "[a-z]{0,8}",
                "[a-z ]{1,8}",
                any::<u8>(),
                proptest::collection::vec((any::<u8>(), "[a-z_]{1,8}", any::<u32>(), any::<i32>()), 0..5)
            )
                .prop_map(|(xid, oid, namespace, name, ri, cols)| LogicalMessage::Relation(
                    RelationBody {
                        xid,
                        oid,
                        namespace,
                        name,
                        replica_identity: ri,
                        columns: cols
                            .into_iter()
                            .map(|(flags, name, type_oid, type_modifier)| ColumnBody {
                                flags,
                                name,
                                type_oid,
                                type_modifier
                            })
                            .collect(),
                    }
                )),
            (xid.clone(), any::<u32>(), tuple()).prop_map(|(xid, oid, new)| LogicalMessage::Insert {
                xid,
                oid,
                new
            }),
            (
                xid.clone(),
                any::<u32>(),
                proptest::option::of(prop_oneof![
                    tuple().prop_map(OldTuple::Key),
                    tuple().prop_map(OldTuple::Full)
                ]),
                tuple()
            )
                .prop_map(|(xid, oid, old, new)| LogicalMessage::Update { xid, oid, old, new }),
            (
                xid,
                any::<u32>(),
                prop_oneof![tuple().prop_map(OldTuple::Key), tuple().prop_map(OldTuple::Full)]
            )
                .prop_map(|(xid, oid, old)| LogicalMessage::Delete { xid, oid, old }),
            (any::<u32>(), any::<bool>())
                .prop_map(|(xid, first_segment)| LogicalMessage::StreamStart { xid, first_segment }),
            Just(LogicalMessage::StreamStop),
            (any::<u32>(), any::<u32>(), proptest::option::of((any::<u64>(), any::<i64>()))).prop_map(
                |(xid, subxid, abort)| LogicalMessage::StreamAbort {
                    xid,
                    subxid,
                    abort: abort.map(|(lsn, time)| (Lsn(lsn), time)),
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_message_decodes_to_what_was_encoded(m in message()) {
            let in_stream = m.stream_xid().is_some();
            prop_assert_eq!(parse(encode(&m), in_stream).unwrap(), m);
        }

        #[test]
        fn truncated_messages_are_errors_not_panics(m in message(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&m);
            let cut = cut.index(bytes.len());
            let in_stream = m.stream_xid().is_some();
            let _ = parse(bytes.slice(..cut), in_stream);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), in_stream in any::<bool>()) {
            let _ = parse(Bytes::from(bytes), in_stream);
        }
    }

    #[test]
    fn unknown_message_type_names_the_tag() {
        let err = parse(Bytes::from_static(b"Z123"), false).unwrap_err();
        assert_eq!(err.tag, 'Z');
    }
}
