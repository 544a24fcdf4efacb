//! Entry points for the coverage-guided fuzz targets (`tests/fuzz/`) and for the test that
//! replays their corpora in `cargo test`: each takes arbitrary bytes, runs one decoder on them
//! as the daemon would, and panics only when a property of the decoder does not hold. A decoder
//! may reject any input; it must never panic, loop or allocate out of proportion to its input.

use bytes::{Buf, Bytes};
use sluice_core::event::{Column, Relation, ReplicaIdentity};
use sluice_core::types::oid;
use sluice_core::{TypeKind, Value};

use crate::binary::DecodeBinary;
use crate::catalog::Table;
use crate::copy::{decode_copy, CopyDecoder};
use crate::decode::Decoder;
use crate::pgoutput::{self, LogicalMessage};
use crate::types::TypeRegistry;

/// The types the value targets choose from (by the input's first byte): every built-in kind,
/// and a one-dimensional array of each, as the type registry builds them.
fn kinds() -> &'static [(u32, TypeKind)] {
    static KINDS: std::sync::OnceLock<Vec<(u32, TypeKind)>> = std::sync::OnceLock::new();
    KINDS.get_or_init(build_kinds)
}

fn build_kinds() -> Vec<(u32, TypeKind)> {
    let scalars = [
        oid::BOOL,
        oid::INT2,
        oid::INT4,
        oid::INT8,
        oid::FLOAT4,
        oid::FLOAT8,
        oid::NUMERIC,
        oid::TEXT,
        oid::BYTEA,
        oid::UUID,
        oid::JSON,
        oid::JSONB,
        oid::DATE,
        oid::TIME,
        oid::TIMESTAMP,
        oid::TIMESTAMPTZ,
        oid::INTERVAL,
    ];
    let registry = TypeRegistry::new();
    let mut kinds: Vec<(u32, TypeKind)> =
        scalars.iter().map(|&o| (o, registry.get(o).expect("built-in type"))).collect();
    for array_oid in
        [1000, 1001, 1005, 1007, 1009, 1016, 1021, 1022, 199, 3807, 1182, 1183, 1115, 1185, 1187, 1231, 2951]
    {
        kinds.push((array_oid, registry.get(array_oid).expect("built-in array type")));
    }
    kinds.push((0, TypeKind::Enum));
    kinds.push((0, TypeKind::Unknown));
    kinds
}

fn pick_kind(selector: u8) -> (u32, TypeKind) {
    let kinds = kinds();
    kinds[selector as usize % kinds.len()].clone()
}

/// What a value prints as, decoded again from that text: the target writes values back into
/// Postgres as this text, so it must read as the same value.
fn assert_text_round_trip(kind: &TypeKind, type_oid: u32, value: &Value, from: &str) {
    if matches!(value, Value::UnknownBinary { .. }) {
        return;
    }
    let printed = value.to_string();
    let again = kind.decode_text(type_oid, &printed).unwrap_or_else(|e| {
        panic!("{kind:?} decoded from {from} prints {printed:?}, which does not decode: {e}")
    });
    assert_eq!(again.to_string(), printed, "{kind:?} decoded from {from} does not read back as itself");
}

/// A text value: the first byte picks the type, the rest is the text (as pgoutput and COPY
/// send it). What decodes must print as text that decodes to the same value.
pub fn text_value(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (type_oid, kind) = pick_kind(selector);
    if let Ok(value) = kind.decode_text(type_oid, text) {
        assert_text_round_trip(&kind, type_oid, &value, "text");
    }
}

/// A binary value (pgoutput with `binary = true`): the first byte picks the type, the rest is
/// the send function's output. What decodes must print as text that decodes to the same value.
pub fn binary_value(data: &[u8]) {
    let Some((&selector, raw)) = data.split_first() else { return };
    let (type_oid, kind) = pick_kind(selector);
    if let Ok(value) = kind.decode_binary(type_oid, raw) {
        assert_text_round_trip(&kind, type_oid, &value, "binary");
    }
}

/// A replication stream: messages framed as a flags byte (bit 0: inside Stream Start/Stop) and
/// a big-endian u16 length, each parsed and fed to one decoder the way the source does, so
/// Relation messages in the input describe the tables its changes refer to. The positions the
/// decoder gives must grow within a transaction.
pub fn pgoutput_stream(data: &[u8]) {
    let mut input = Bytes::copy_from_slice(data);
    let mut decoder = Decoder::default().dropping_origins(vec!["sluice_reverse".into()]);
    let mut last_ordinal = 0u32;
    while input.remaining() >= 3 {
        let flags = input.get_u8();
        let len = (input.get_u16() as usize).min(input.remaining());
        let payload = input.split_to(len);
        let Ok(message) = pgoutput::parse(payload, flags & 1 != 0) else { continue };
        let event = match message {
            LogicalMessage::Begin { final_lsn, commit_time, xid } => {
                decoder.begin(final_lsn, xid, commit_time)
            }
            LogicalMessage::Commit { end_lsn, commit_time, .. } => decoder.commit(end_lsn, commit_time),
            LogicalMessage::StreamStart { .. }
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamAbort { .. }
            | LogicalMessage::StreamCommit { .. } => continue,
            message => match decoder.change(message) {
                Ok(Some(event)) => Ok(event),
                Ok(None) => continue,
                Err(e) => Err(e),
            },
        };
        let Ok(event) = event else {
            decoder.reset_transaction();
            continue;
        };
        if let Some(position) = event.position() {
            if position.tx_ordinal != 0 {
                assert!(position.tx_ordinal > last_ordinal, "a transaction's ordinals must grow");
            }
            last_ordinal = position.tx_ordinal;
        }
    }
}

/// A table with a column of every kind COPY's text reaches, keyed by the first two.
fn copy_table() -> Table {
    let columns = [
        ("id", oid::INT8),
        ("name", oid::TEXT),
        ("amount", oid::NUMERIC),
        ("at", oid::TIMESTAMPTZ),
        ("tags", 1009),
        ("blob", oid::BYTEA),
        ("doc", oid::JSONB),
        ("span", oid::INTERVAL),
        ("flag", oid::BOOL),
    ];
    let registry = TypeRegistry::new();
    let relation = Relation {
        oid: 1,
        namespace: "public".into(),
        name: "fuzzed".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: columns
            .iter()
            .enumerate()
            .map(|(i, &(name, type_oid))| Column {
                name: name.into(),
                type_oid,
                type_modifier: -1,
                is_key: i < 2,
                kind: registry.get(type_oid).expect("built-in type"),
            })
            .collect(),
    };
    Table { relation, primary_key: vec![0, 1], sql_types: vec![String::new(); columns.len()] }
}

/// COPY's text format for `copy_table`: the first byte cuts the rest into the parts it
/// arrives in. Decoding the parts must give what decoding the whole gives.
pub fn copy(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else { return };
    let table = copy_table();
    let whole = decode_copy(rest, &table);
    let step = cut as usize + 1;
    let mut decoder = CopyDecoder::new(&table);
    let mut parts = Ok(());
    for part in rest.chunks(step) {
        parts = decoder.feed(part);
        if parts.is_err() {
            break;
        }
    }
    let parts = parts.and_then(|()| decoder.finish());
    match (&whole, &parts) {
        (Ok((rows, key)), Ok((rows2, key2))) => {
            assert_eq!(key, key2, "the last key differs when the data comes in parts of {step}");
            let print = |rows: &Vec<Vec<Value>>| format!("{rows:?}");
            assert_eq!(print(rows), print(rows2), "rows differ when the data comes in parts of {step}");
        }
        (Err(_), Err(_)) => {}
        _ => panic!("decoding in parts of {step} gives {parts:?}, the whole {whole:?}"),
    }
}

/// The first byte that makes the value targets pick the type `type_oid` (for seeds taken from
/// real columns); `None` for a type they do not cover.
pub fn selector(type_oid: u32) -> Option<u8> {
    kinds().iter().position(|(o, _)| *o == type_oid && type_oid != 0).map(|i| i as u8)
}

/// The column names and type OIDs of the table the COPY target decodes, for seeds.
pub fn copy_columns() -> Vec<(String, u32)> {
    copy_table().relation.columns.iter().map(|c| (c.name.clone(), c.type_oid)).collect()
}
