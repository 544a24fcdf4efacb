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
