//! Every supported type streams through the real server and decodes to exactly the value
//! Postgres holds: the decoded value prints the same text Postgres prints for the column.

use sluice_core::{ChangeEvent, NewRow, Numeric, Value};

use crate::harness::{row_changes, TestDb};

const TABLE: &str = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'très bien');
CREATE DOMAIN positive AS int8 CHECK (VALUE > 0);
CREATE TABLE all_types (
  id int PRIMARY KEY,
  b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric, n_scaled numeric(50,10),
  t text, vc varchar(20), c char(5), ba bytea, u uuid, j json, jb jsonb,
  d date, tm time, ts timestamp, tstz timestamptz, iv interval, e mood, dom positive,
  a_int int4[], a_text text[], a_num numeric[], a_tstz timestamptz[], a_mood mood[], a_2d int8[][], a_bool bool[],
  pt point, ip inet
);
CREATE PUBLICATION p FOR TABLE all_types;";

const ROWS: &[&str] = &[
    "INSERT INTO all_types VALUES (1, true, 32767, -2147483648, 9223372036854775807, 1.5, 0.1,
       '1234567890123456789012345678901234567890.123456789', '-12345678901234567890123456789012345678.1234567890',
       'zoë 😀 日本語 \\ \"quoted\"', 'varchar', 'ab', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
       '{\"a\": 1,  \"b\": [true, null]}', '{\"z\": {\"deep\": [1.50, \"x\"]}, \"a\": 2}',
       '2024-02-29', '23:59:59.999999', '2024-05-01 12:34:56.789', '2024-05-01 12:34:56.789+05:30',
       '1 year 2 mons 3 days 04:05:06.7', 'très bien', 42,
       '{1,NULL,3}', '{\"a b\",\"c\\\"d\",NULL,\"NULL\",\"\"}', '{1.10,NaN,-3}', '{\"2024-01-01 00:00:00+00\",infinity}',
       '{sad,\"très bien\"}', '{{1,2},{3,4}}', '{t,f}', '(1.5,-2)', '192.168.0.1/24')",
    "INSERT INTO all_types (id, f4, f8, n, d, ts, tstz, iv, i8, i2, n_scaled) VALUES
       (2, '-Infinity', 'NaN', 'NaN', '0044-03-15 BC', '-infinity', 'infinity', '-1 days -00:00:01', -9223372036854775808, -32768, '0.0000000001')",
    "INSERT INTO all_types (id, n, f8, d, tstz, f4, iv) VALUES (3, 'Infinity', '-0', 'infinity', '0001-01-01 00:00:00+00 BC', 3.4028235e38, '-178000000 years')",
    "INSERT INTO all_types (id, n, f8, tm, ts, iv) VALUES (4, '-Infinity', 1e300, '24:00:00', '294276-12-31 23:59:59.999999', '5 mins 0.000001 secs')",
    "INSERT INTO all_types (id) VALUES (5)",
];

/// The row as Postgres' output functions print it (the text result format), column by column.
async fn pg_text_of(db: &TestDb, id: i32) -> Vec<Option<String>> {
    let client = sluice_postgres::connect_sql(&db.connection()).await.expect("sql connection");
    let messages = client.simple_query(&format!("SELECT * FROM all_types WHERE id = {id}")).await.unwrap();
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("the row");
    (0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_decodes_to_the_value_postgres_holds() {
    every_type_round_trips(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_decodes_to_the_value_postgres_holds_in_binary_format() {
    every_type_round_trips(true).await;
}

/// Unknown types in the binary format carry their send-function bytes, not their text.
const UNKNOWN_TYPE_COLUMNS: &[&str] = &["pt", "ip"];

async fn every_type_round_trips(binary: bool) {
    let db = TestDb::new();
    db.sql(TABLE);
    let repl = sluice_postgres::ReplicationConfig { binary, ..db.replication("types", "p") };
    let mut stream = db.stream(repl).await;
    for row in ROWS {
        db.sql(row);
    }
    let events = stream.commits(ROWS.len()).await;
    let inserts = row_changes(&events);
    assert_eq!(inserts.len(), ROWS.len());
    for (index, event) in inserts.iter().enumerate() {
        let ChangeEvent::Insert { relation, new, .. } = event else {
            panic!("expected an insert, got {event:?}")
        };
        assert_eq!(relation.qualified_name(), "public.all_types");
        let expected = pg_text_of(&db, index as i32 + 1).await;
        for ((column, value), pg_text) in relation.columns.iter().zip(new).zip(&expected) {
            match pg_text {
                None => assert_eq!(value, &Value::Null, "row {} column {}", index + 1, column.name),
                Some(_) if binary && UNKNOWN_TYPE_COLUMNS.contains(&column.name.as_str()) => {
                    assert!(matches!(value, Value::UnknownBinary { .. }), "{value:?}")
                }
                Some(text) => assert_eq!(
                    &value.to_string(),
                    text,
                    "row {} column {} ({value:?})",
                    index + 1,
                    column.name
                ),
            }
        }
    }

    // Typed checks on top of the text comparison.
    let ChangeEvent::Insert { relation, new, .. } = inserts[0] else { unreachable!() };
    let col = |name: &str| &new[relation.columns.iter().position(|c| c.name == name).unwrap()];
    assert_eq!(
        col("n"),
        &Value::Numeric(Numeric::Finite("1234567890123456789012345678901234567890.123456789".into()))
    );
    assert_eq!(col("i8"), &Value::Int8(i64::MAX));
    assert_eq!(col("t"), &Value::Text("zoë 😀 日本語 \\ \"quoted\"".into()));
    assert_eq!(col("e"), &Value::Enum("très bien".into()));
    assert_eq!(col("dom"), &Value::Int8(42), "a domain decodes as its base type");
    assert_eq!(col("ba"), &Value::Bytea(vec![0x00, 0xff, 0x10]));
    let Value::TimestampTz(ts) = col("tstz") else { panic!("timestamptz") };
    assert_eq!(ts.unix_micros(), Some(1_714_547_096_789_000), "12:34:56.789+05:30 is 07:04:56.789 UTC");
    assert_eq!(
        col("a_mood"),
        &Value::Array(vec![Value::Enum("sad".into()), Value::Enum("très bien".into())])
    );
    assert_eq!(
        col("a_2d"),
        &Value::Array(vec![
            Value::Array(vec![Value::Int8(1), Value::Int8(2)]),
            Value::Array(vec![Value::Int8(3), Value::Int8(4)]),
        ])
    );
    if binary {
        assert!(
            matches!(col("pt"), Value::UnknownBinary { type_oid: 600, .. }),
            "point travels as bytes with its OID"
        );
    } else {
        assert!(
            matches!(col("pt"), Value::Unknown { type_oid: 600, .. }),
            "point travels as text with its OID"
        );
    }
    let ChangeEvent::Insert { new: specials, .. } = inserts[1] else { unreachable!() };
    let at = |name: &str| &specials[relation.columns.iter().position(|c| c.name == name).unwrap()];
    assert_eq!(at("n"), &Value::Numeric(Numeric::NaN));
    assert!(matches!(at("f8"), Value::Float8(v) if v.is_nan()));
    assert_eq!(at("f4"), &Value::Float4(f32::NEG_INFINITY));
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toast_values_stream_whole_and_unchanged_toast_is_marked_on_update() {
    let db = TestDb::new();
    db.sql(
        "CREATE TABLE docs (id int PRIMARY KEY, version int, body text); CREATE PUBLICATION p FOR TABLE docs",
    );
    let mut stream = db.stream(db.replication("toast", "p")).await;
    // ~40 KB of poorly compressible text: stored out of line in the TOAST table.
    db.sql("INSERT INTO docs SELECT 1, 1, string_agg(md5(g::text), '') FROM generate_series(1, 1250) g");
    db.sql("UPDATE docs SET version = 2 WHERE id = 1");
    db.sql("UPDATE docs SET body = body || 'more', version = 3 WHERE id = 1");
    let events = stream.commits(3).await;
    let changes = row_changes(&events);
    let body: String = db.sql("SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1250) g");
    assert_eq!(body.len(), 40_000);
    let ChangeEvent::Insert { new, .. } = changes[0] else { panic!("insert") };
    assert_eq!(new[2], Value::Text(body.clone()), "the TOASTed value arrives whole");
    let ChangeEvent::Update { new: NewRow::Partial(values), .. } = changes[1] else {
        panic!("an update that leaves the TOASTed column alone carries a partial row: {:?}", changes[1])
    };
    assert_eq!(values, &vec![Some(Value::Int4(1)), Some(Value::Int4(2)), None]);
    let ChangeEvent::Update { new: NewRow::Full(values), .. } = changes[2] else {
        panic!("full row when the column changed")
    };
    assert_eq!(values[2], Value::Text(format!("{body}more")));
    stream.stop().await.unwrap();
}
