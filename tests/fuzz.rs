//! The fuzz targets' corpora (`tests/fuzz/corpus/<target>/`) and the inputs that once made a
//! target fail (`tests/fuzz/regressions/<target>/`), replayed through the same entry points
//! the fuzzer drives; and the seeds those corpora started from, taken from a real Postgres.

use std::path::{Path, PathBuf};

use crate::harness::TestDb;

/// A fuzz target's entry point.
type Entry = fn(&[u8]);

/// Each fuzz target, and the entry point it drives.
const TARGETS: &[(&str, Entry)] = &[
    ("pgoutput_stream", sluice_postgres::fuzz::pgoutput_stream),
    ("binary_value", sluice_postgres::fuzz::binary_value),
    ("text_value", sluice_postgres::fuzz::text_value),
    ("copy", sluice_postgres::fuzz::copy),
    ("config", sluice::fuzz::config),
    ("mapping", sluice::fuzz::mapping),
    ("kafka_record", sluice::fuzz::kafka_record),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("directory entry").path()).collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_passes_its_target() {
    for (target, run) in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(target));
        assert!(corpus.len() >= 4, "the corpus of {target} has {} inputs", corpus.len());
        let regressions = inputs(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read an input");
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{target} fails on {}", path.display());
            }
        }
    }
}

/// FNV-1a, to name a seed by its content.
fn content_name(data: &[u8]) -> String {
    let hash =
        data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("seed-{hash:016x}")
}

fn write_seed(target: &str, data: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    std::fs::write(dir.join(content_name(data)), data).expect("write a seed");
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

/// Rows with the awkward values each type has: extremes, special values, escapes, NULLs.
const CHANGES: &[&str] = &[
    "INSERT INTO every_type VALUES (1, true, -32768, 2147483647, 9223372036854775807, 1.5e-40, -1.7976931348623157e308, \
     'NaN', 'tab\there\nnewline \\ backslash \"quoted\" ünï', 'short', '\\x00ff10', \
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2.5, null]}', '{\"b\": {\"c\": \"d\"}}', '4713-01-01 BC', \
     '24:00:00', 'infinity', '-infinity', '1 year 2 mons -3 days 04:05:06.789', \
     '{1,NULL,3}', '{\"a b\",\"NULL\",\"\",\"x,y\",\"q\\\"\"}', '{{1.5,-2},{NaN,Infinity}}', '{2020-02-29 12:00:00+05:30}', 'sad', repeat('toast', 4000))",
    "INSERT INTO every_type VALUES (2, false, 0, 0, 0, 'Infinity', 'NaN', '-0.000000000000000000001', '', NULL, '\\x', \
     '00000000-0000-0000-0000-000000000000', 'null', '[]', '294276-12-31', '00:00:00', '2000-01-01 00:00:00', \
     '1999-12-31 23:59:59.999999+14', '-178000000 years', '{}', '{}', '{}', '{}', 'happy', NULL)",
    "INSERT INTO every_type (id, n, iv, ai) VALUES (3, '123456789012345678901234567890.123456789012345678901234567890', \
     '@ 1 minute ago', '[2:3]={7,8}')",
    "INSERT INTO every_type (id, n) VALUES (4, '-Infinity'), (5, '1e-1000'), (6, '99999999999999999999.99999')",
    "UPDATE every_type SET i4 = i4 - 1, t = 'changed' WHERE id = 1",
    "UPDATE every_type SET id = 10 WHERE id = 2",
    "DELETE FROM every_type WHERE id = 3",
    "UPDATE keyed_by_default SET note = 'x' || note",
    "DELETE FROM keyed_by_default WHERE a = 1",
    "SELECT pg_logical_emit_message(true, 'sluice-test', 'transactional content'); \
     SELECT pg_logical_emit_message(false, 'other', '\\x00ff'::bytea)",
    "TRUNCATE keyed_by_default, every_type RESTART IDENTITY CASCADE",
    "INSERT INTO keyed_by_default SELECT g, g::text, md5(g::text) FROM generate_series(1, 3000) g",
];

/// Seeds for every target from a real Postgres: the pgoutput messages of a session over tables
/// with every decoded type (text and binary, protocol 1 and 2 with a streamed transaction);
/// the values they carry; COPY's output for the COPY target's table; the configurations and
/// mappings of the README and `schemas/`. Run with `--ignored` to refresh them.
#[test]
#[ignore = "writes seeds into tests/fuzz/corpus; run to refresh them"]
fn seeds_of_kafka_records() {
    for seed in sluice::fuzz::kafka_record_seeds() {
        write_seed("kafka_record", &seed);
    }
}

#[test]
#[ignore = "writes seeds into tests/fuzz/corpus; run to refresh them"]
fn seeds_from_real_postgres() {
    let db = TestDb::new();
    db.sql(
        "CREATE TYPE mood AS ENUM ('sad', 'happy'); \
         CREATE TABLE every_type (id int8 PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, \
           n numeric, t text, vc varchar(20), by bytea, u uuid, j json, jb jsonb, d date, tm time, ts timestamp, \
           tz timestamptz, iv interval, ai int4[], at text[], an numeric[], atz timestamptz[], e mood, big text); \
         ALTER TABLE every_type REPLICA IDENTITY FULL; \
         CREATE TABLE keyed_by_default (a int4 PRIMARY KEY, b text, note text); \
         INSERT INTO keyed_by_default SELECT g, g::text, 'n' FROM generate_series(1, 20) g; \
         CREATE PUBLICATION fuzz_pub FOR ALL TABLES",
    );
    let slot = db.slot_name("fuzz");
    db.sql(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"));
    for change in CHANGES {
        db.sql(change);
    }
    for (binary, protocol) in [("false", "1"), ("true", "1"), ("false", "2"), ("true", "2")] {
        let rows = db.sql(&format!(
            "SET logical_decoding_work_mem = '64kB'; \
             SELECT encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, \
               'proto_version', '{protocol}', 'publication_names', 'fuzz_pub', 'binary', '{binary}', \
               'messages', 'true', 'streaming', '{}')",
            if protocol == "2" { "on" } else { "off" }
        ));
        let messages: Vec<Vec<u8>> = rows.lines().filter(|l| !l.is_empty()).map(hex).collect();
        seeds_from_messages(&messages);
    }
    db.sql(&format!("SELECT pg_drop_replication_slot('{slot}')"));

    let columns = sluice_postgres::fuzz::copy_columns();
    let definition: Vec<String> = columns
        .iter()
        .map(|(name, type_oid)| {
            let sql_type = match *type_oid {
                20 => "int8",
                1700 => "numeric",
                1184 => "timestamptz",
                1009 => "text[]",
                17 => "bytea",
                3802 => "jsonb",
                1186 => "interval",
                16 => "bool",
                _ => "text",
            };
            format!("{name} {sql_type}")
        })
        .collect();
    db.sql(&format!("CREATE TABLE copy_rows ({})", definition.join(", ")));
    db.sql(
        "INSERT INTO copy_rows VALUES \
           (1, 'plain', 1.5, '2020-01-01 00:00:00+00', '{a,b}', '\\x01', '{\"k\": 1}', '1 day', true), \
           (2, E'tab\\there\\nline\\\\back\\rcr', 'NaN', 'infinity', '{\"x y\",NULL,\"\"}', '\\x', 'null', '-1 mon', false), \
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL), \
           (4, 'ünïcödé ✓', '-123456789.000000001', '1970-01-01 00:00:00.000001+00', '{}', '\\xdeadbeef', '[1, \"two\"]', '@ 3 hours ago', true)",
    );
    let copied = db.sql("COPY copy_rows TO STDOUT") + "\n";
    for cut in [0u8, 1, 7, 255] {
        let mut seed = vec![cut];
        seed.extend_from_slice(copied.as_bytes());
        write_seed("copy", &seed);
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    for block in readme.split("```toml").skip(1) {
        let text = block.split("```").next().unwrap_or_default();
        write_seed("config", text.as_bytes());
        write_seed("mapping", text.as_bytes());
    }
    for dir in ["schemas/examples", "schemas/postgres/examples"] {
        for path in inputs(&root.join(dir)) {
            write_seed("mapping", &std::fs::read(path).expect("read a mapping"));
        }
    }
}

/// Stream seeds (each transaction after the Relation messages before it, framed as the stream
/// target reads them, at most 40 messages) and one value seed per column value.
fn seeds_from_messages(messages: &[Vec<u8>]) {
    use sluice_postgres::pgoutput::{parse, ColumnData, LogicalMessage};
    let mut relations = Vec::new();
    let mut current = Vec::new();
    let mut count = 0;
    let mut in_stream = false;
    let mut types: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for message in messages {
        let Ok(len) = u16::try_from(message.len()) else { continue };
        let mut frame = vec![u8::from(in_stream)];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(message);
        let parsed = parse(bytes::Bytes::copy_from_slice(message), in_stream)
            .unwrap_or_else(|e| panic!("a real message does not parse: {e}"));
        let ends = matches!(
            parsed,
            LogicalMessage::Commit { .. }
                | LogicalMessage::StreamStop
                | LogicalMessage::StreamCommit { .. }
                | LogicalMessage::StreamAbort { .. }
                | LogicalMessage::Message { transactional: false, .. }
        );
        if matches!(parsed, LogicalMessage::Relation(_)) {
            relations.extend_from_slice(&frame);
        }
        if count < 40 {
            current.extend_from_slice(&frame);
            count += 1;
        }
        if ends {
            let mut seed = relations.clone();
            seed.append(&mut current);
            write_seed("pgoutput_stream", &seed);
            count = 0;
        }
        let tuple = match parsed {
            LogicalMessage::StreamStart { .. } => {
                in_stream = true;
                continue;
            }
            LogicalMessage::StreamStop => {
                in_stream = false;
                continue;
            }
            LogicalMessage::Relation(body) => {
                types.insert(body.oid, body.columns.iter().map(|c| c.type_oid).collect());
                continue;
            }
            LogicalMessage::Insert { oid, new, .. } | LogicalMessage::Update { oid, new, .. } => (oid, new),
            _ => continue,
        };
        let (oid, tuple) = tuple;
        let Some(column_types) = types.get(&oid) else { continue };
        for (type_oid, data) in column_types.iter().zip(tuple.0) {
            let Some(selector) = sluice_postgres::fuzz::selector(*type_oid) else { continue };
            let (target, bytes) = match data {
                ColumnData::Text(bytes) => ("text_value", bytes),
                ColumnData::Binary(bytes) => ("binary_value", bytes),
                _ => continue,
            };
            if bytes.len() > 4096 {
                continue;
            }
            let mut seed = vec![selector];
            seed.extend_from_slice(&bytes);
            write_seed(target, &seed);
        }
    }
}
