//! sluice's own CDC records read back into change events: what the Kafka source hands to the
//! pipeline, so that the DynamoDB version guard and the Postgres target work on them as on the
//! stream they came from.
//!
//! A record is sluice's when it carries the `sluice.relation` header (`format.rs`) and its
//! value is the jsonl shape of an insert, read, update, delete or truncate. Each value is read
//! back as the type the header gives its column: the exact inverse of the JSON the target
//! wrote (numerics keep every digit, json keeps its text, bytea comes back from base64,
//! timestamps from RFC 3339). A tombstone (no value) carries no change. Anything else is not
//! sluice's format, and the reason says what is missing, never a value.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_core::{
    ChangeEvent, Date, Interval, Lsn, NewRow, Numeric, OldRow, Position, Relation, Time, Timestamp, TypeKind,
    Value,
};

use super::format::{read_relation_header, HEADER_COMMIT_TIME, HEADER_RELATION};

/// What a record holds.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A change, with its transaction's commit time (microseconds since 2000-01-01) when the
    /// record carries it.
    Change(ChangeEvent, Option<i64>),
    /// A tombstone: compaction's marker after a delete, no change of its own.
    Tombstone,
}

/// Reads records, keeping one relation per distinct table shape (records of one table share
/// one `Arc<Relation>` until its shape changes).
#[derive(Default)]
pub struct RecordReader {
    relations: HashMap<(String, Vec<u8>), Arc<Relation>>,
}

/// Relations kept at most; a reader that sees more starts its cache again.
const RELATIONS_KEPT: usize = 1024;

#[derive(Deserialize)]
struct RecordJson<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    commit_lsn: Cow<'a, str>,
    ordinal: u32,
    #[serde(default, borrow)]
    table: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    new: Option<&'a RawValue>,
    #[serde(default, borrow)]
    old_kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    old: Option<&'a RawValue>,
    #[serde(default, borrow)]
    unchanged_toast: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    tables: Vec<Cow<'a, str>>,
    #[serde(default)]
    cascade: bool,
    #[serde(default)]
    restart_identity: bool,
}

impl RecordReader {
    /// The change a record holds, from its headers and value; the error says why it is not
    /// sluice's format.
    pub fn read(&mut self, headers: &[(String, Vec<u8>)], payload: Option<&[u8]>) -> Result<Decoded, String> {
        let Some(payload) = payload else { return Ok(Decoded::Tombstone) };
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice());
        let shape = header(HEADER_RELATION).ok_or_else(|| {
            format!("no {HEADER_RELATION} header: not a CDC record of this sluice version (another producer, or an older sluice)")
        })?;
        let record: RecordJson<'_> = serde_json::from_slice(payload).map_err(|e| {
            // serde's messages quote the offending text: only the place is said.
            format!(
                "the value is not a sluice CDC record (no valid JSON object at line {} column {})",
                e.line(),
                e.column()
            )
        })?;
        let position = Position {
            commit_lsn: record
                .commit_lsn
                .parse::<Lsn>()
                .map_err(|_| "the value's commit_lsn is not an LSN".to_string())?,
            tx_ordinal: record.ordinal,
        };
        let table = match (&record.table, record.tables.first()) {
            (Some(table), _) | (None, Some(table)) => table.as_ref(),
            (None, None) => return Err("the value names no table".into()),
        };
        let relation = self.relation(table, shape)?;
        let commit_time = header(HEADER_COMMIT_TIME)
            .map(|t| std::str::from_utf8(t).ok().and_then(|t| t.parse::<i64>().ok()))
            .map(|t| t.ok_or_else(|| format!("the {HEADER_COMMIT_TIME} header is not a number")))
            .transpose()?;
        let op = record.op.as_ref();
        let row = |raw, what| row(raw, op, what);
        let event = match op {
            "insert" | "read" => ChangeEvent::Insert {
                position,
                new: row(record.new, "new")?.full(&relation, "new")?,
                relation,
                snapshot: op == "read",
            },
            "update" => {
                let new = row(record.new, "new")?;
                if let Some(name) =
                    record.unchanged_toast.iter().find(|u| !relation.columns.iter().any(|c| c.name == **u))
                {
                    return Err(format!(
                        "unchanged_toast names a column {name:?} the {HEADER_RELATION} header does not list"
                    ));
                }
                let new = new.partial(&relation, &record.unchanged_toast)?;
                // Every value sent: a full row, whatever unchanged_toast says.
                let new = match new.iter().all(Option::is_some) {
                    true => NewRow::Full(new.into_iter().flatten().collect()),
                    false => NewRow::Partial(new),
                };
                let old = match record.old {
                    None => None,
                    Some(_) => Some(old_row(&relation, record.old_kind.as_deref(), row(record.old, "old")?)?),
                };
                ChangeEvent::Update { position, old, new, relation }
            }
            "delete" => {
                let old = old_row(&relation, record.old_kind.as_deref(), row(record.old, "old")?)?;
                ChangeEvent::Delete { position, old, relation }
            }
            "truncate" => ChangeEvent::Truncate {
                position,
                relations: vec![relation],
                cascade: record.cascade,
                restart_identity: record.restart_identity,
            },
            _ => return Err("the value's op is none of insert, read, update, delete, truncate".into()),
        };
        Ok(Decoded::Change(event, commit_time))
    }

    fn relation(&mut self, table: &str, shape: &[u8]) -> Result<Arc<Relation>, String> {
        if let Some(relation) = self.relations.get(&(table.to_owned(), shape.to_vec())) {
            return Ok(Arc::clone(relation));
        }
        let relation = read_relation_header(shape, table)?;
        if self.relations.len() >= RELATIONS_KEPT {
            self.relations.clear();
        }
        self.relations.insert((table.to_owned(), shape.to_vec()), Arc::clone(&relation));
        Ok(relation)
    }
}

/// The row object `raw` of an `op` record (`what`: new or old).
fn row<'a>(raw: Option<&'a RawValue>, op: &str, what: &str) -> Result<Row<'a>, String> {
    let raw = raw.ok_or_else(|| format!("the {op} record has no {what} row"))?;
    serde_json::from_str::<HashMap<Cow<'a, str>, &'a RawValue>>(raw.get())
        .map(Row)
        .map_err(|_| format!("the {what} row is not a JSON object"))
}

/// A row object: column name → the value's JSON.
struct Row<'a>(HashMap<Cow<'a, str>, &'a RawValue>);

impl Row<'_> {
    fn value(&self, relation: &Relation, index: usize) -> Result<Option<Value>, String> {
        let column = &relation.columns[index];
        self.0
            .get(column.name.as_str())
            .map(|raw| {
                value(&column.kind, column.type_oid, raw)
                    .map_err(|reason| format!("column {}: {reason}", column.name))
            })
            .transpose()
    }

    fn check_names(&self, relation: &Relation) -> Result<(), String> {
        match self.0.keys().find(|name| !relation.columns.iter().any(|c| c.name == **name)) {
            Some(name) => {
                Err(format!("the row has a column {name:?} the {HEADER_RELATION} header does not list"))
            }
            None => Ok(()),
        }
    }

    /// Every column's value.
    fn full(&self, relation: &Relation, what: &str) -> Result<Vec<Value>, String> {
        self.check_names(relation)?;
        (0..relation.columns.len())
            .map(|i| {
                self.value(relation, i)?
                    .ok_or_else(|| format!("the {what} row lacks column {}", relation.columns[i].name))
            })
            .collect()
    }

    /// An update's new row whose `unchanged` columns (unchanged TOAST) were not sent.
    fn partial(&self, relation: &Relation, unchanged: &[Cow<'_, str>]) -> Result<Vec<Option<Value>>, String> {
        self.check_names(relation)?;
        (0..relation.columns.len())
            .map(|i| match self.value(relation, i)? {
                Some(value) => Ok(Some(value)),
                None if unchanged.iter().any(|u| *u == relation.columns[i].name) => Ok(None),
                None => Err(format!("the new row lacks column {}", relation.columns[i].name)),
            })
            .collect()
    }

    /// A key-only old row: its identity columns, the others NULL (whatever the row holds
    /// for them, as the target writes only the identity columns).
    fn key(&self, relation: &Relation) -> Result<Vec<Value>, String> {
        self.check_names(relation)?;
        (0..relation.columns.len())
            .map(|i| match relation.columns[i].is_key {
                false => Ok(Value::Null),
                true => self
                    .value(relation, i)?
                    .ok_or_else(|| format!("the old row lacks key column {}", relation.columns[i].name)),
            })
            .collect()
    }
}

fn old_row(relation: &Relation, kind: Option<&str>, row: Row<'_>) -> Result<OldRow, String> {
    match kind {
        Some("key") => Ok(OldRow::Key(row.key(relation)?)),
        Some("full") => Ok(OldRow::Full(row.full(relation, "old")?)),
        _ => Err("the old row's old_kind is neither key nor full".into()),
    }
}

/// One value of a column of type `kind` (`type_oid` in the source), as `json::write_value`
/// wrote it.
pub fn value(kind: &TypeKind, type_oid: u32, raw: &RawValue) -> Result<Value, String> {
    let text = raw.get();
    if text == "null" {
        return Ok(Value::Null);
    }
    let string = || serde_json::from_str::<String>(text).map_err(|_| "expected a string".to_string());
    let number = |type_name: &str| -> Result<&str, String> {
        match text.as_bytes().first() {
            Some(b'-' | b'0'..=b'9') => Ok(text),
            _ => Err(format!("expected a {type_name} number")),
        }
    };
    let bad = |e: sluice_core::value::ValueError| e.reason;
    Ok(match kind {
        TypeKind::Json | TypeKind::Jsonb => Value::Json(text.to_owned()),
        TypeKind::Array { element, element_oid, .. } => {
            let items: Vec<&RawValue> =
                serde_json::from_str(text).map_err(|_| "expected an array".to_string())?;
            let items = items.into_iter().map(|item| {
                // A nested array is a further dimension of the same element type.
                if item.get().starts_with('[') && !matches!(**element, TypeKind::Json | TypeKind::Jsonb) {
                    value(kind, type_oid, item)
                } else {
                    value(element, *element_oid, item)
                }
            });
            Value::Array(items.collect::<Result<_, _>>()?)
        }
        TypeKind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err("expected true or false".into()),
        },
        TypeKind::Int2 => Value::Int2(number("int2")?.parse().map_err(|_| "not a 16-bit integer")?),
        TypeKind::Int4 => Value::Int4(number("int4")?.parse().map_err(|_| "not a 32-bit integer")?),
        TypeKind::Int8 => Value::Int8(number("int8")?.parse().map_err(|_| "not a 64-bit integer")?),
        TypeKind::Float4 => Value::Float4(float(text, &string)? as f32),
        TypeKind::Float8 => Value::Float8(float(text, &string)?),
        TypeKind::Numeric => Value::Numeric(Numeric::parse(&string()?).map_err(bad)?),
        TypeKind::Text => Value::Text(string()?),
        TypeKind::Enum => Value::Enum(string()?),
        TypeKind::Unknown => Value::Unknown { type_oid, text: string()? },
        TypeKind::Bytea => Value::Bytea(
            base64::engine::general_purpose::STANDARD
                .decode(string()?)
                .map_err(|_| "expected base64".to_string())?,
        ),
        TypeKind::Uuid => kind.decode_text(type_oid, &string()?).map_err(bad)?,
        TypeKind::Date => Value::Date(Date::parse(&pg_date(&string()?)).map_err(bad)?),
        TypeKind::Time => Value::Time(Time::parse(&string()?).map_err(bad)?),
        TypeKind::Timestamp => Value::Timestamp(iso_timestamp(&string()?, false).map_err(bad)?),
        TypeKind::TimestampTz => Value::TimestampTz(iso_timestamp(&string()?, true).map_err(bad)?),
        TypeKind::Interval => Value::Interval(Interval::parse(&string()?).map_err(bad)?),
    })
}

/// A float: a JSON number, or one of the strings `NaN`, `Infinity`, `-Infinity`. Read as f64
/// text, then narrowed for float4 (the shortest f32 text reads back exactly either way).
fn float(text: &str, string: &dyn Fn() -> Result<String, String>) -> Result<f64, String> {
    if text.starts_with('"') {
        return match string()?.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => Err("expected a number, NaN, Infinity or -Infinity".into()),
        };
    }
    text.parse().map_err(|_| "expected a number".into())
}

/// An ISO date (`-0044-03-15` is astronomical year -44) as Postgres writes it
/// (`0045-03-15 BC`).
fn pg_date(iso: &str) -> String {
    match iso.strip_prefix('-') {
        Some(rest) if iso != "-infinity" => match rest.split_once('-') {
            Some((year, month_day)) => match year.parse::<i64>() {
                Ok(year) => format!("{:04}-{month_day} BC", year + 1),
                Err(_) => iso.to_owned(),
            },
            None => iso.to_owned(),
        },
        _ => iso.to_owned(),
    }
}

/// RFC 3339 as `Timestamp::write_iso` writes it (`T` between date and time, `Z` with a zone).
fn iso_timestamp(iso: &str, with_zone: bool) -> Result<Timestamp, sluice_core::value::ValueError> {
    if iso == "infinity" || iso == "-infinity" {
        return Timestamp::parse(iso, with_zone);
    }
    let text = if with_zone { iso.strip_suffix('Z').unwrap_or(iso) } else { iso };
    let (date, time) = text.split_once('T').unwrap_or((text, ""));
    let date = pg_date(date);
    let (date, bc) = match date.strip_suffix(" BC") {
        Some(date) => (date.to_owned(), " BC"),
        None => (date, ""),
    };
    let zone = if with_zone { "+00" } else { "" };
    Timestamp::parse(&format!("{date} {time}{zone}{bc}"), with_zone)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sluice_core::{Column, ReplicaIdentity};

    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    fn written(value: &Value) -> Box<RawValue> {
        let mut out = Vec::new();
        crate::json::write_value(&mut out, value);
        raw(std::str::from_utf8(&out).unwrap())
    }

    fn round_trip(kind: &TypeKind, value: &Value) -> Value {
        super::value(kind, 0, &written(value)).unwrap_or_else(|e| panic!("{value:?}: {e}"))
    }

    #[test]
    fn each_type_reads_back_as_written() {
        let cases = [
            (TypeKind::Bool, Value::Bool(true)),
            (TypeKind::Int2, Value::Int2(-7)),
            (TypeKind::Int8, Value::Int8(i64::MIN)),
            (TypeKind::Float4, Value::Float4(0.1)),
            (TypeKind::Float4, Value::Float4(f32::NEG_INFINITY)),
            (TypeKind::Float8, Value::Float8(1e300)),
            (TypeKind::Float8, Value::Float8(-0.0)),
            (TypeKind::Numeric, Value::Numeric(Numeric::parse("-12345678901234567890.000100").unwrap())),
            (TypeKind::Numeric, Value::Numeric(Numeric::parse("NaN").unwrap())),
            (TypeKind::Text, Value::Text("a \"quoted\"\nline\u{1}".into())),
            (TypeKind::Bytea, Value::Bytea(vec![0, 255, 10])),
            (TypeKind::Uuid, Value::Uuid([0xab; 16])),
            (TypeKind::Json, Value::Json("{\"b\": [1, 2],  \"a\": null}".into())),
            (TypeKind::Date, Value::Date(Date::parse("2024-02-29").unwrap())),
            (TypeKind::Date, Value::Date(Date::parse("0045-03-15 BC").unwrap())),
            (TypeKind::Date, Value::Date(Date::parse("0001-01-01 BC").unwrap())),
            (TypeKind::Date, Value::Date(Date::NEG_INFINITY)),
            (TypeKind::Time, Value::Time(Time::parse("23:59:59.000001").unwrap())),
            (
                TypeKind::Timestamp,
                Value::Timestamp(Timestamp::parse("2024-05-01 12:00:00.5", false).unwrap()),
            ),
            (
                TypeKind::TimestampTz,
                Value::TimestampTz(Timestamp::parse("0100-05-01 12:00:00+02 BC", true).unwrap()),
            ),
            (TypeKind::TimestampTz, Value::TimestampTz(Timestamp::INFINITY)),
            (TypeKind::Interval, Value::Interval(Interval::parse("P1Y2M3DT4H5M6.5S").unwrap())),
            (TypeKind::Enum, Value::Enum("gold".into())),
            (TypeKind::Int4, Value::Null),
        ];
        for (kind, value) in cases {
            let back = round_trip(&kind, &value);
            assert_eq!(format!("{back:?}"), format!("{value:?}"), "{kind:?}");
        }
        let ints = TypeKind::Array { element: Box::new(TypeKind::Int4), element_oid: 23, delimiter: b',' };
        let grid = Value::Array(vec![
            Value::Array(vec![Value::Int4(1), Value::Null]),
            Value::Array(vec![Value::Int4(3), Value::Int4(4)]),
        ]);
        assert_eq!(round_trip(&ints, &grid), grid);
        assert_eq!(
            super::value(&TypeKind::Unknown, 600, &raw("\"(1,2)\"")).unwrap(),
            Value::Unknown { type_oid: 600, text: "(1,2)".into() }
        );
    }

    #[test]
    fn a_value_of_the_wrong_shape_is_refused_by_its_type() {
        assert!(super::value(&TypeKind::Int4, 23, &raw("\"12\"")).unwrap_err().contains("int4"));
        assert!(super::value(&TypeKind::Int2, 21, &raw("70000")).is_err());
        assert!(super::value(&TypeKind::Bytea, 17, &raw("\"!!\"")).unwrap_err().contains("base64"));
        assert!(super::value(&TypeKind::Bool, 16, &raw("1")).is_err());
    }

    proptest! {
        #[test]
        fn integers_floats_and_text_read_back_exactly(i in any::<i64>(), f in any::<f64>(), g in any::<f32>(), s in ".*") {
            prop_assert_eq!(round_trip(&TypeKind::Int8, &Value::Int8(i)), Value::Int8(i));
            let back = round_trip(&TypeKind::Float8, &Value::Float8(f));
            prop_assert!(matches!(back, Value::Float8(b) if b.to_bits() == f.to_bits() || (b.is_nan() && f.is_nan())));
            let back = round_trip(&TypeKind::Float4, &Value::Float4(g));
            prop_assert!(matches!(back, Value::Float4(b) if b.to_bits() == g.to_bits() || (b.is_nan() && g.is_nan())));
            prop_assert_eq!(round_trip(&TypeKind::Text, &Value::Text(s.clone())), Value::Text(s));
        }

        #[test]
        fn timestamps_read_back_exactly(micros in -211_813_488_000_000_000i64..9_223_371_331_199_999_999i64) {
            let ts = Timestamp(micros);
            prop_assert_eq!(round_trip(&TypeKind::TimestampTz, &Value::TimestampTz(ts)), Value::TimestampTz(ts));
            prop_assert_eq!(round_trip(&TypeKind::Timestamp, &Value::Timestamp(ts)), Value::Timestamp(ts));
        }
    }

    fn accounts() -> Arc<Relation> {
        Arc::new(Relation {
            oid: 16384,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                    is_key: true,
                    kind: TypeKind::Int8,
                },
                Column {
                    name: "note".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    is_key: false,
                    kind: TypeKind::Text,
                },
            ],
        })
    }

    /// The records the Kafka translator makes for `event`, read back.
    fn through_kafka(event: ChangeEvent) -> Vec<Decoded> {
        let mut translator =
            super::super::translate::KafkaTranslator::new("{schema}.{table}", HashMap::new(), true, None);
        let begin = ChangeEvent::Begin {
            position: Position { commit_lsn: Lsn(0x2000), tx_ordinal: 0 },
            xid: 7,
            commit_time: Timestamp(789_000_000),
        };
        let mut records = Vec::new();
        translator.translate(&begin, &mut records).unwrap();
        translator.translate(&event, &mut records).unwrap();
        let mut reader = RecordReader::default();
        records.iter().map(|r| reader.read(&r.headers, r.payload.as_deref()).unwrap()).collect()
    }

    #[test]
    fn each_change_reads_back_from_its_records() {
        let position = Position { commit_lsn: Lsn(0x2000), tx_ordinal: 3 };
        let relation = accounts();
        let changes = [
            ChangeEvent::Insert {
                position,
                relation: Arc::clone(&relation),
                new: vec![Value::Int8(1), Value::Text("x".into())],
                snapshot: false,
            },
            ChangeEvent::Insert {
                position,
                relation: Arc::clone(&relation),
                new: vec![Value::Int8(1), Value::Null],
                snapshot: true,
            },
            ChangeEvent::Update {
                position,
                relation: Arc::clone(&relation),
                old: None,
                new: NewRow::Partial(vec![Some(Value::Int8(1)), None]),
            },
            ChangeEvent::Update {
                position,
                relation: Arc::clone(&relation),
                old: Some(OldRow::Full(vec![Value::Int8(2), Value::Text("y".into())])),
                new: NewRow::Full(vec![Value::Int8(1), Value::Text("z".into())]),
            },
            ChangeEvent::Truncate {
                position,
                relations: vec![Arc::clone(&relation)],
                cascade: true,
                restart_identity: false,
            },
        ];
        for change in changes {
            // A key change is followed by the old key's tombstone.
            let records = through_kafka(change.clone());
            assert_eq!(records[0], Decoded::Change(change, Some(789_000_000)));
            assert!(records[1..].iter().all(|r| *r == Decoded::Tombstone));
        }
        // A delete is followed by its key's tombstone.
        let delete = ChangeEvent::Delete {
            position,
            relation: Arc::clone(&relation),
            old: OldRow::Key(vec![Value::Int8(1), Value::Null]),
        };
        assert_eq!(
            through_kafka(delete.clone()),
            vec![Decoded::Change(delete, Some(789_000_000)), Decoded::Tombstone]
        );
    }

    #[test]
    fn a_record_of_another_format_is_refused_with_what_it_lacks() {
        let mut reader = RecordReader::default();
        let reason = reader.read(&[], Some(b"{\"id\":1}")).unwrap_err();
        assert!(reason.contains("sluice.relation"), "{reason}");
        let shape = super::super::format::relation_header(&accounts());
        let headers = vec![(HEADER_RELATION.to_owned(), shape)];
        let reason = reader.read(&headers, Some(b"not json {\"secret\"")).unwrap_err();
        assert!(!reason.contains("secret"), "never a value: {reason}");
        let reason = reader
            .read(&headers, Some(b"{\"op\":\"insert\",\"commit_lsn\":\"0/10\",\"ordinal\":1,\"table\":\"public.accounts\",\"new\":{\"id\":1}}"))
            .unwrap_err();
        assert!(reason.contains("lacks column note"), "{reason}");
        let reason = reader
            .read(&headers, Some(b"{\"op\":\"insert\",\"commit_lsn\":\"0/10\",\"ordinal\":1,\"table\":\"public.accounts\",\"new\":{\"id\":\"one\",\"note\":null}}"))
            .unwrap_err();
        assert!(reason.contains("column id") && !reason.contains("one"), "{reason}");
    }
}
