//! The JSON shape of change events and values, written by hand into a byte buffer (no
//! intermediate tree): the jsonl target's format, documented in the README.
//!
//! Values: integers as numbers; float specials and numerics as strings (numerics keep every
//! digit); bytea as base64; uuid, dates, times and intervals as ISO 8601 strings; timestamptz in
//! UTC with `Z`; json/jsonb embedded as JSON; arrays as arrays; unknown types as their text.

use std::io::Write;

use base64::Engine;

use sluice_core::{ChangeEvent, Lsn, NewRow, OldRow, Position, Relation, Timestamp, Value};

/// Appends one JSON line (with the trailing newline) for `event`; `false` when the event has no line.
pub fn write_event(out: &mut Vec<u8>, event: &ChangeEvent, transactions: bool) -> bool {
    match event {
        ChangeEvent::Relation(_) => return false,
        ChangeEvent::Begin { .. } | ChangeEvent::Commit { .. } if !transactions => return false,
        _ => {}
    }
    out.push(b'{');
    match event {
        ChangeEvent::Begin { position, xid, commit_time } => {
            op(out, "begin", position);
            let _ = write!(out, ",\"xid\":{xid},\"commit_time\":");
            timestamp(out, *commit_time, true);
        }
        ChangeEvent::Commit { position, end_lsn, commit_time } => {
            op(out, "commit", position);
            lsn_field(out, "end_lsn", *end_lsn);
            out.extend_from_slice(b",\"commit_time\":");
            timestamp(out, *commit_time, true);
        }
        ChangeEvent::Insert { position, relation, new, snapshot } => {
            op(out, if *snapshot { "read" } else { "insert" }, position);
            table(out, relation);
            out.extend_from_slice(b",\"new\":");
            row(out, relation, new.iter().map(Some));
        }
        ChangeEvent::Update { position, relation, old, new } => {
            op(out, "update", position);
            table(out, relation);
            old_row(out, relation, old.as_ref());
            out.extend_from_slice(b",\"new\":");
            match new {
                NewRow::Full(values) => row(out, relation, values.iter().map(Some)),
                NewRow::Partial(values) => {
                    row(out, relation, values.iter().map(Option::as_ref));
                    out.extend_from_slice(b",\"unchanged_toast\":[");
                    let unchanged = relation.columns.iter().zip(values).filter(|(_, v)| v.is_none());
                    for (i, (column, _)) in unchanged.enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        string(out, &column.name);
                    }
                    out.push(b']');
                }
            }
        }
        ChangeEvent::Delete { position, relation, old } => {
            op(out, "delete", position);
            table(out, relation);
            old_row(out, relation, Some(old));
        }
        ChangeEvent::Truncate { position, relations, cascade, restart_identity } => {
            op(out, "truncate", position);
            out.extend_from_slice(b",\"tables\":[");
            for (i, relation) in relations.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(out, &relation.qualified_name());
            }
            let _ = write!(out, "],\"cascade\":{cascade},\"restart_identity\":{restart_identity}");
        }
        ChangeEvent::Message { position, transactional, prefix, content } => {
            op(out, "message", position);
            let _ = write!(out, ",\"transactional\":{transactional},\"prefix\":");
            string(out, prefix);
            out.extend_from_slice(b",\"content\":");
            string(out, &base64::engine::general_purpose::STANDARD.encode(content));
        }
        ChangeEvent::Relation(_) => unreachable!("filtered above"),
    }
    out.extend_from_slice(b"}\n");
    true
}

fn op(out: &mut Vec<u8>, name: &str, position: &Position) {
    let _ = write!(
        out,
        "\"op\":\"{name}\",\"commit_lsn\":\"{}\",\"ordinal\":{}",
        position.commit_lsn, position.tx_ordinal
    );
}

fn lsn_field(out: &mut Vec<u8>, name: &str, lsn: Lsn) {
    let _ = write!(out, ",\"{name}\":\"{lsn}\"");
}

fn table(out: &mut Vec<u8>, relation: &Relation) {
    out.extend_from_slice(b",\"table\":");
    string(out, &relation.qualified_name());
}

fn old_row(out: &mut Vec<u8>, relation: &Relation, old: Option<&OldRow>) {
    match old {
        None => out.extend_from_slice(b",\"old\":null"),
        Some(old) => {
            let (kind, values) = match old {
                OldRow::Key(v) => ("key", v),
                OldRow::Full(v) => ("full", v),
            };
            let _ = write!(out, ",\"old_kind\":\"{kind}\",\"old\":");
            // A key-only old row lists just the identity columns.
            let key_only = matches!(old, OldRow::Key(_));
            let shown = relation
                .columns
                .iter()
                .zip(values)
                .map(|(column, value)| (!key_only || column.is_key).then_some(value));
            row(out, relation, shown);
        }
    }
}

/// `{"col": value, …}`; columns whose value is `None` (unchanged TOAST) are left out.
pub fn row<'a>(out: &mut Vec<u8>, relation: &Relation, values: impl Iterator<Item = Option<&'a Value>>) {
    out.push(b'{');
    let mut first = true;
    for (column, value) in relation.columns.iter().zip(values) {
        let Some(value) = value else { continue };
        if !first {
            out.push(b',');
        }
        first = false;
        string(out, &column.name);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// `[a,b,…]`, each item written by `write`.
pub fn array<T>(out: &mut Vec<u8>, items: &[T], write: impl Fn(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(b']');
}

/// A JSON string with the escapes JSON requires.
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn timestamp(out: &mut Vec<u8>, ts: Timestamp, with_zone: bool) {
    let mut text = String::with_capacity(32);
    let _ = ts.write_iso(&mut text, with_zone);
    string(out, &text);
}

/// One value in the documented JSON shape.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int2(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Int4(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Int8(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Float4(v) if v.is_finite() => {
            let _ = write!(out, "{v}");
        }
        Value::Float8(v) if v.is_finite() => {
            let _ = write!(out, "{v}");
        }
        Value::Float4(_)
        | Value::Float8(_)
        | Value::Numeric(_)
        | Value::Interval(_)
        | Value::Time(_)
        | Value::Uuid(_) => string(out, &value.to_string()),
        Value::Text(s) | Value::Enum(s) | Value::Unknown { text: s, .. } => string(out, s),
        Value::Json(raw) => out.extend_from_slice(raw.as_bytes()),
        Value::Bytea(bytes) | Value::UnknownBinary { bytes, .. } => {
            string(out, &base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Value::Date(date) => match date.ymd() {
            Some((year, month, day)) => {
                let text = if year < 0 {
                    format!("-{:04}-{month:02}-{day:02}", -year)
                } else {
                    format!("{year:04}-{month:02}-{day:02}")
                };
                string(out, &text);
            }
            None => string(out, &date.to_string()),
        },
        Value::Timestamp(ts) => timestamp(out, *ts, false),
        Value::TimestampTz(ts) => timestamp(out, *ts, true),
        Value::Array(items) => array(out, items, write_value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::{Date, Numeric};

    fn json(value: &Value) -> serde_json::Value {
        let mut out = Vec::new();
        write_value(&mut out, value);
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

    #[test]
    fn values_have_the_documented_json_shape() {
        assert_eq!(json(&Value::Int8(i64::MAX)), serde_json::json!(i64::MAX));
        assert_eq!(json(&Value::Float8(f64::NAN)), serde_json::json!("NaN"));
        assert_eq!(json(&Value::Numeric(Numeric::Finite("1.50".into()))), serde_json::json!("1.50"));
        assert_eq!(json(&Value::Bytea(vec![0, 1, 2])), serde_json::json!("AAEC"));
        assert_eq!(json(&Value::Date(Date(0))), serde_json::json!("2000-01-01"));
        assert_eq!(
            json(&Value::Date(Date::parse("0044-03-15 BC").unwrap())),
            serde_json::json!("-0043-03-15")
        );
        assert_eq!(
            json(&Value::TimestampTz(Timestamp(1_500_000))),
            serde_json::json!("2000-01-01T00:00:01.5Z")
        );
        assert_eq!(json(&Value::Json("{\"a\": [1, 2]}".into())), serde_json::json!({"a": [1, 2]}));
        assert_eq!(json(&Value::Array(vec![Value::Int4(1), Value::Null])), serde_json::json!([1, null]));
        assert_eq!(
            json(&Value::Text("tab\there \"q\" \u{1} é".into())),
            serde_json::json!("tab\there \"q\" \u{1} é")
        );
    }

    fn event_json(event: &ChangeEvent) -> serde_json::Value {
        let mut out = Vec::new();
        assert!(write_event(&mut out, event, true));
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn row_events_have_the_documented_shape() {
        use sluice_core::TypeKind;
        use sluice_core::{Column, Lsn, NewRow, OldRow, Position, Relation, ReplicaIdentity};
        let column = |name: &str, is_key: bool| Column {
            name: name.into(),
            type_oid: 20,
            type_modifier: -1,
            is_key,
            kind: TypeKind::Int8,
        };
        let relation = std::sync::Arc::new(Relation {
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![column("id", true), column("a", false), column("big", false)],
        });
        let position = Position { commit_lsn: Lsn(0x1_0000_0010), tx_ordinal: 3 };
        let update = ChangeEvent::Update {
            position,
            relation: std::sync::Arc::clone(&relation),
            old: Some(OldRow::Key(vec![Value::Int8(1), Value::Null, Value::Null])),
            new: NewRow::Partial(vec![Some(Value::Int8(2)), Some(Value::Null), None]),
        };
        assert_eq!(
            event_json(&update),
            serde_json::json!({"op": "update", "commit_lsn": "1/10", "ordinal": 3, "table": "public.t",
                "old_kind": "key", "old": {"id": 1}, "new": {"id": 2, "a": null}, "unchanged_toast": ["big"]})
        );
        let delete = ChangeEvent::Delete {
            position,
            relation,
            old: OldRow::Full(vec![Value::Int8(1), Value::Int8(5), Value::Null]),
        };
        assert_eq!(
            event_json(&delete),
            serde_json::json!({"op": "delete", "commit_lsn": "1/10", "ordinal": 3, "table": "public.t",
                "old_kind": "full", "old": {"id": 1, "a": 5, "big": null}})
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_valid_json(s in ".*") {
            proptest::prop_assert_eq!(json(&Value::Text(s.clone())), serde_json::json!(s));
        }
    }
}
