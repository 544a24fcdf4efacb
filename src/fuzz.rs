//! Entry points for the coverage-guided fuzz targets of the configuration and mapping parsers
//! (`tests/fuzz/`), and for the test that replays their corpora in `cargo test`. Each takes
//! arbitrary bytes and panics only when a property does not hold: any input may be refused,
//! with problems that each name something; what is accepted must compile and translate
//! changes without panicking.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use sluice_core::types::oid;
use sluice_core::{ChangeEvent, Column, Lsn, NewRow, OldRow, Position, Relation, ReplicaIdentity, Value};

use crate::config::{Config, ConfigError};
use crate::targets::dynamodb::mapping::Mapping;
use crate::targets::dynamodb::translate::MappingTranslator;
use crate::targets::postgres::mapping::PgMapping;
use crate::targets::postgres::translate::PgTranslator;
use crate::translate::mapping::MappingFile;
use crate::translate::Context;

/// A configuration file's text, with no environment overrides. A refusal must name what is
/// at fault.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::from_toml(text, std::iter::empty(), Path::new("fuzz.toml")) {
        Ok(config) => assert!(config.validate().is_empty(), "an accepted configuration has problems"),
        Err(ConfigError::Invalid { problems }) => {
            assert!(!problems.is_empty(), "a refusal without a problem");
            for p in problems {
                assert!(!p.message.is_empty(), "a problem without a message at {:?}", p.key);
            }
        }
        Err(ConfigError::Syntax { message, .. }) => {
            assert!(!message.is_empty(), "a syntax error without a message")
        }
        Err(ConfigError::Read { .. }) => unreachable!("nothing is read"),
    }
}

/// Columns the mapped tables get, so that what a mapping names is usually there.
const COLUMNS: &[(&str, u32)] = &[
    ("id", oid::INT8),
    ("customer_id", oid::INT8),
    ("email", oid::TEXT),
    ("name", oid::TEXT),
    ("status", oid::TEXT),
    ("balance", oid::NUMERIC),
    ("total", oid::NUMERIC),
    ("created_at", oid::TIMESTAMPTZ),
    ("day", oid::DATE),
    ("tags", 1009),
    ("prefs", oid::JSONB),
    ("payload", oid::JSONB),
    ("aggregate_type", oid::TEXT),
    ("aggregate_id", oid::TEXT),
    ("event_type", oid::TEXT),
    ("password_hash", oid::TEXT),
];

fn sample(type_oid: u32, n: i64) -> Value {
    match type_oid {
        oid::INT8 => Value::Int8(n),
        oid::NUMERIC => Value::Numeric(sluice_core::Numeric::Finite(format!("{n}.25"))),
        oid::TIMESTAMPTZ => Value::TimestampTz(sluice_core::Timestamp(n * 1_000_000)),
        oid::DATE => Value::Date(sluice_core::Date(n as i32)),
        1009 => Value::Array(vec![Value::Text(format!("t{n}")), Value::Null]),
        oid::JSONB => Value::Json(format!("{{\"n\": {n}}}")),
        _ => Value::Text(format!("v{n}")),
    }
}

/// The changes a translator is given for each mapped table: an insert, an update of the key
/// and a delete.
fn changes(sources: &[&str]) -> Vec<ChangeEvent> {
    let registry = sluice_postgres::types::TypeRegistry::new();
    let mut events = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let (namespace, name) = source.split_once('.').unwrap_or(("public", source));
        let relation = Arc::new(Relation {
            oid: i as u32 + 1,
            namespace: namespace.into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Full,
            columns: COLUMNS
                .iter()
                .map(|&(name, type_oid)| Column {
                    name: name.into(),
                    type_oid,
                    type_modifier: -1,
                    is_key: name == "id",
                    kind: registry.get(type_oid).expect("built-in type"),
                })
                .collect(),
        });
        let row = |n: i64| COLUMNS.iter().map(|&(_, t)| sample(t, n)).collect::<Vec<_>>();
        let at = |ordinal| Position { commit_lsn: Lsn(0x100 + i as u64), tx_ordinal: ordinal };
        events.push(ChangeEvent::Relation(Arc::clone(&relation)));
        events.push(ChangeEvent::Insert {
            position: at(1),
            relation: Arc::clone(&relation),
            new: row(1),
            snapshot: false,
        });
        events.push(ChangeEvent::Update {
            position: at(2),
            relation: Arc::clone(&relation),
            old: Some(OldRow::Full(row(1))),
            new: NewRow::Partial(
                row(2).into_iter().enumerate().map(|(c, v)| (c % 3 != 0).then_some(v)).collect(),
            ),
        });
        events.push(ChangeEvent::Delete { position: at(3), relation, old: OldRow::Full(row(2)) });
    }
    events
}

/// A mapping file's text, read as each format (DynamoDB, Postgres and the Postgres way back).
/// What is accepted must compile and translate changes of its tables without panicking.
pub fn mapping(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let context = Context { now_unix_seconds: 1_700_000_000 };
    match Mapping::parse(text) {
        Ok(mapping) => {
            let translator = MappingTranslator::new(&mapping);
            let mut out = Vec::new();
            for event in changes(&mapping.sources()) {
                let _ = translator.translate(&event, context.now_unix_seconds, &mut out);
            }
        }
        Err(problems) => assert_named(&problems),
    }
    match PgMapping::parse(text) {
        Ok(mapping) => {
            let keys: HashMap<String, Vec<String>> =
                mapping.tables.iter().map(|t| (t.target.clone(), vec!["id".to_owned()])).collect();
            let sources: Vec<&str> = mapping.sources();
            let translator = PgTranslator::new(&mapping, &keys);
            let mut out = Vec::new();
            for event in changes(&sources) {
                let _ = translator.translate(&event, &mut out);
            }
            if let Err(problems) = mapping.inverted() {
                assert_named(&problems);
            }
        }
        Err(problems) => assert_named(&problems),
    }
}

fn assert_named(problems: &[sluice_core::Problem]) {
    assert!(!problems.is_empty(), "a refusal without a problem");
    for p in problems {
        assert!(!p.message.is_empty(), "a problem without a message at {:?}", p.key);
    }
}

/// A Kafka record as the Kafka source reads it: the bytes before the first NUL are the
/// `sluice.relation` header (none without a NUL), the rest the value. Any record may be
/// refused; one that is read must say which change it holds, and that change written back as
/// a record (the Kafka target's translator) must read back the same (the decoder is the
/// target's exact inverse on everything it accepts).
pub fn kafka_record(data: &[u8]) {
    use crate::targets::kafka::format::HEADER_RELATION;
    use crate::targets::kafka::inverse::{Decoded, RecordReader};
    let (headers, payload) = match data.iter().position(|&b| b == 0) {
        Some(at) => (vec![(HEADER_RELATION.to_owned(), data[..at].to_vec())], &data[at + 1..]),
        None => (Vec::new(), data),
    };
    let mut reader = RecordReader::default();
    let Ok(Decoded::Change(event, _)) = reader.read(&headers, Some(payload)) else { return };
    let mut translator =
        crate::targets::kafka::translate::KafkaTranslator::new("t", HashMap::new(), false, None);
    let mut records = Vec::new();
    translator.translate(&event, &mut records).expect("a decoded change translates");
    let record = records.first().expect("a change makes a record");
    match reader.read(&record.headers, record.payload.as_deref()) {
        Ok(Decoded::Change(again, _)) => {
            assert_eq!(format!("{again:?}"), format!("{event:?}"), "the change reads back")
        }
        other => panic!("a written change does not read back: {other:?}"),
    }
}

/// Seeds for [`kafka_record`]: records of each operation and of every value type, as the
/// Kafka target writes them, in the fuzz input's layout.
pub fn kafka_record_seeds() -> Vec<Vec<u8>> {
    use sluice_core::{Date, Interval, Numeric, Time, Timestamp, TypeKind};
    let kinds: &[(&str, u32, TypeKind, Value)] = &[
        ("id", oid::INT8, TypeKind::Int8, Value::Int8(7)),
        ("flag", oid::BOOL, TypeKind::Bool, Value::Bool(true)),
        ("small", oid::INT2, TypeKind::Int2, Value::Int2(-3)),
        ("f4", oid::FLOAT4, TypeKind::Float4, Value::Float4(f32::NAN)),
        ("f8", oid::FLOAT8, TypeKind::Float8, Value::Float8(-1.5e-300)),
        (
            "amount",
            oid::NUMERIC,
            TypeKind::Numeric,
            Value::Numeric(Numeric::parse("-12.340").expect("numeric")),
        ),
        ("note", oid::TEXT, TypeKind::Text, Value::Text("a \"b\"\n".into())),
        ("raw", oid::BYTEA, TypeKind::Bytea, Value::Bytea(vec![0, 1, 255])),
        ("uid", oid::UUID, TypeKind::Uuid, Value::Uuid([7; 16])),
        ("doc", oid::JSONB, TypeKind::Jsonb, Value::Json("{\"a\": [1, null]}".into())),
        ("day", oid::DATE, TypeKind::Date, Value::Date(Date::parse("0044-03-15 BC").expect("date"))),
        ("at", oid::TIME, TypeKind::Time, Value::Time(Time::parse("12:00:00.25").expect("time"))),
        ("ts", oid::TIMESTAMP, TypeKind::Timestamp, Value::Timestamp(Timestamp::INFINITY)),
        ("tz", oid::TIMESTAMPTZ, TypeKind::TimestampTz, Value::TimestampTz(Timestamp(1))),
        ("span", 1186, TypeKind::Interval, Value::Interval(Interval::parse("P1M-2DT3S").expect("interval"))),
        ("mood", 90_000, TypeKind::Enum, Value::Enum("ok".into())),
        ("point", 600, TypeKind::Unknown, Value::Unknown { type_oid: 600, text: "(1,2)".into() }),
        (
            "tags",
            1009,
            TypeKind::Array { element: Box::new(TypeKind::Text), element_oid: oid::TEXT, delimiter: b',' },
            Value::Array(vec![Value::Text("x".into()), Value::Null]),
        ),
    ];
    let relation = Arc::new(Relation {
        oid: 16_384,
        namespace: "public".into(),
        name: "things".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: kinds
            .iter()
            .map(|(name, type_oid, kind, _)| Column {
                name: (*name).into(),
                type_oid: *type_oid,
                type_modifier: -1,
                is_key: *name == "id",
                kind: kind.clone(),
            })
            .collect(),
    });
    let row: Vec<Value> = kinds.iter().map(|(_, _, _, value)| value.clone()).collect();
    let position = Position { commit_lsn: Lsn(0x16B_3748), tx_ordinal: 2 };
    let mut partial: Vec<Option<Value>> = row.iter().cloned().map(Some).collect();
    partial[6] = None;
    let events = [
        ChangeEvent::Insert { position, relation: Arc::clone(&relation), new: row.clone(), snapshot: false },
        ChangeEvent::Insert { position, relation: Arc::clone(&relation), new: row.clone(), snapshot: true },
        ChangeEvent::Update {
            position,
            relation: Arc::clone(&relation),
            old: Some(OldRow::Full(row.clone())),
            new: NewRow::Partial(partial),
        },
        ChangeEvent::Delete { position, relation: Arc::clone(&relation), old: OldRow::Key(row.clone()) },
        ChangeEvent::Truncate {
            position,
            relations: vec![Arc::clone(&relation)],
            cascade: false,
            restart_identity: true,
        },
    ];
    let mut translator =
        crate::targets::kafka::translate::KafkaTranslator::new("t", HashMap::new(), false, None);
    let mut seeds = Vec::new();
    for event in &events {
        let mut records = Vec::new();
        translator.translate(event, &mut records).expect("translates");
        for record in records {
            let header =
                record.headers.iter().find(|(n, _)| n == crate::targets::kafka::format::HEADER_RELATION);
            let mut seed = header.map(|(_, v)| v.clone()).unwrap_or_default();
            seed.push(0);
            seed.extend(record.payload.unwrap_or_default());
            seeds.push(seed);
        }
    }
    seeds
}

#[cfg(test)]
mod kafka_record_tests {
    #[test]
    fn every_seed_reads_back_through_the_target() {
        let seeds = super::kafka_record_seeds();
        assert_eq!(seeds.len(), 5);
        let mut reader = crate::targets::kafka::inverse::RecordReader::default();
        for seed in seeds {
            let at = seed.iter().position(|&b| b == 0).expect("a header");
            let headers =
                vec![(crate::targets::kafka::format::HEADER_RELATION.to_owned(), seed[..at].to_vec())];
            let read = reader.read(&headers, Some(&seed[at + 1..]));
            assert!(matches!(read, Ok(crate::targets::kafka::inverse::Decoded::Change(..))), "{read:?}");
            super::kafka_record(&seed);
        }
    }
}
