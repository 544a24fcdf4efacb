//! Change events to Kafka records: pure, no I/O.
//!
//! Plain CDC: a row change becomes one record on the table's topic (`topic` template over
//! `{schema}` and `{table}`, or a per-table override). The key is the JSON object of the
//! replica-identity columns (`{"id":42}`); the value is the change as the jsonl target writes
//! it (operation, table, position, old and new row); headers carry the operation, the table
//! and the position. A delete is followed by a tombstone for its key (`tombstones_on_delete`),
//! and so is an update that changes the key, so that compacted topics forget the old key.
//!
//! Outbox event router (Debezium-compatible defaults): a row inserted into the outbox table,
//! or a `pg_logical_emit_message` message with the outbox prefix whose content is a JSON
//! object of the same fields, becomes one record: topic from the `aggregatetype` (template
//! `outbox.event.{aggregatetype}`), key = `aggregateid`, value = `payload` (json/jsonb kept as
//! JSON text, bytea as bytes, a NULL payload is a tombstone), headers `id` (the event id), the
//! configured header columns, and the source position. Updates and deletes of outbox rows are
//! ignored: applications may delete an outbox row right after inserting it.

use std::collections::HashMap;

use sluice_kafka::Record;

use crate::event::{ChangeEvent, NewRow, OldRow, Position, Relation, Value};

/// The outbox router's settings (the target's `[target.outbox]`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// The outbox table (`schema.table`) whose inserts are events.
    #[serde(default)]
    pub table: Option<String>,
    /// Also route `pg_logical_emit_message` messages with this prefix (content: a JSON object).
    #[serde(default)]
    pub message_prefix: Option<String>,
    /// Topic template over `{aggregatetype}`.
    #[serde(default = "default_outbox_topic")]
    pub topic: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    #[serde(default = "default_aggregate_type_column")]
    pub aggregate_type_column: String,
    #[serde(default = "default_aggregate_id_column")]
    pub aggregate_id_column: String,
    #[serde(default = "default_type_column")]
    pub type_column: String,
    #[serde(default = "default_payload_column")]
    pub payload_column: String,
    /// Further columns (or message fields) copied into headers of the same name; the event
    /// type column is one by default.
    #[serde(default = "default_header_columns")]
    pub header_columns: Vec<String>,
}

fn default_outbox_topic() -> String {
    "outbox.event.{aggregatetype}".into()
}
fn default_id_column() -> String {
    "id".into()
}
fn default_aggregate_type_column() -> String {
    "aggregatetype".into()
}
fn default_aggregate_id_column() -> String {
    "aggregateid".into()
}
fn default_type_column() -> String {
    "type".into()
}
fn default_payload_column() -> String {
    "payload".into()
}
fn default_header_columns() -> Vec<String> {
    vec!["type".into()]
}

/// Why a change produced no record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    /// This change can never become a record (an outbox row without an aggregate type):
    /// dead-letter it.
    #[error("{table}: {reason}")]
    Poison { table: String, reason: String },
}

pub struct KafkaTranslator {
    topic: String,
    topics: HashMap<String, String>,
    tombstones_on_delete: bool,
    outbox: Option<OutboxConfig>,
}

/// Header names.
pub const HEADER_OP: &str = "sluice.op";
pub const HEADER_TABLE: &str = "sluice.table";
pub const HEADER_POSITION: &str = "sluice.position";

impl KafkaTranslator {
    pub fn new(topic: &str, topics: HashMap<String, String>, tombstones_on_delete: bool, outbox: Option<OutboxConfig>) -> Self {
        KafkaTranslator { topic: topic.to_owned(), topics, tombstones_on_delete, outbox }
    }

    /// The records for one event, appended to `out` in the order they must be produced.
    pub fn translate(&self, event: &ChangeEvent, out: &mut Vec<Record>) -> Result<(), TranslateError> {
        if let Some(outbox) = &self.outbox {
            match event {
                ChangeEvent::Insert { relation, new, position } if outbox.table.as_deref() == Some(relation.qualified_name().as_str()) => {
                    return route_row(outbox, relation, new, *position, out);
                }
                ChangeEvent::Update { relation, .. } | ChangeEvent::Delete { relation, .. }
                    if outbox.table.as_deref() == Some(relation.qualified_name().as_str()) =>
                {
                    return Ok(());
                }
                ChangeEvent::Message { prefix, content, position, .. } if outbox.message_prefix.as_deref() == Some(prefix.as_str()) => {
                    return route_message(outbox, prefix, content, *position, out);
                }
                _ => {}
            }
        }
        let (relation, position, op) = match event {
            ChangeEvent::Insert { relation, position, .. } => (relation, *position, "insert"),
            ChangeEvent::Update { relation, position, .. } => (relation, *position, "update"),
            ChangeEvent::Delete { relation, position, .. } => (relation, *position, "delete"),
            ChangeEvent::Truncate { relations, position, .. } => {
                for relation in relations {
                    let mut value = Vec::new();
                    crate::json::write_event(&mut value, event, false);
                    trim_newline(&mut value);
                    out.push(Record { topic: self.topic_for(relation), key: None, payload: Some(value), headers: headers("truncate", relation, *position) });
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        let topic = self.topic_for(relation);
        let key = match event {
            ChangeEvent::Insert { new, .. } => key_json(relation, new.iter().map(Some)),
            ChangeEvent::Update { new: NewRow::Full(values), .. } => key_json(relation, values.iter().map(Some)),
            ChangeEvent::Update { new: NewRow::Partial(values), .. } => key_json(relation, values.iter().map(Option::as_ref)),
            ChangeEvent::Delete { old, .. } => key_json(relation, old.values().iter().map(Some)),
            _ => None,
        };
        let mut value = Vec::new();
        crate::json::write_event(&mut value, event, false);
        trim_newline(&mut value);
        out.push(Record { topic: topic.clone(), key: key.clone(), payload: Some(value), headers: headers(op, relation, position) });
        if self.tombstones_on_delete {
            let dead_key = match event {
                ChangeEvent::Delete { .. } => key,
                // A key change: the old key is gone.
                ChangeEvent::Update { old: Some(OldRow::Key(old) | OldRow::Full(old)), .. } => {
                    let old_key = key_json(relation, old.iter().map(Some));
                    if old_key != key {
                        old_key
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let Some(dead_key) = dead_key {
                out.push(Record { topic, key: Some(dead_key), payload: None, headers: headers("tombstone", relation, position) });
            }
        }
        Ok(())
    }

    fn topic_for(&self, relation: &Relation) -> String {
        match self.topics.get(&relation.qualified_name()) {
            Some(topic) => topic.clone(),
            None => self.topic.replace("{schema}", &relation.namespace).replace("{table}", &relation.name),
        }
    }
}

fn trim_newline(value: &mut Vec<u8>) {
    if value.last() == Some(&b'\n') {
        value.pop();
    }
}

fn headers(op: &str, relation: &Relation, position: Position) -> Vec<(String, Vec<u8>)> {
    vec![
        (HEADER_OP.into(), op.as_bytes().to_vec()),
        (HEADER_TABLE.into(), relation.qualified_name().into_bytes()),
        (HEADER_POSITION.into(), position_text(position).into_bytes()),
    ]
}

/// `commit_lsn/ordinal`, e.g. `0/16B3748/3`: orders changes exactly, for deduplication.
pub fn position_text(position: Position) -> String {
    format!("{}/{}", position.commit_lsn, position.tx_ordinal)
}

/// `{"col":value,…}` over the replica-identity columns; `None` when the table has none, or
/// when a key column's value is absent.
fn key_json<'a>(relation: &Relation, values: impl Iterator<Item = Option<&'a Value>>) -> Option<Vec<u8>> {
    let values: Vec<Option<&Value>> = values.collect();
    let mut keys = relation.columns.iter().zip(&values).filter(|(column, _)| column.is_key).peekable();
    keys.peek()?;
    if keys.any(|(_, value)| value.is_none()) {
        return None;
    }
    let mut out = Vec::new();
    let shown = relation.columns.iter().zip(values).map(|(column, value)| value.filter(|_| column.is_key));
    crate::json::row(&mut out, relation, shown);
    Some(out)
}

/// A topic name Kafka accepts: 1–249 of `[A-Za-z0-9._-]`.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 249 && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The text of a value for keys and headers.
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Text(s) | Value::Enum(s) | Value::Json(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn route_row(outbox: &OutboxConfig, relation: &Relation, values: &[Value], position: Position, out: &mut Vec<Record>) -> Result<(), TranslateError> {
    let table = relation.qualified_name();
    let column = |name: &str| relation.columns.iter().position(|c| c.name == name).map(|i| &values[i]);
    let poison = |reason: String| TranslateError::Poison { table: table.clone(), reason };
    let field_text = |name: &str| -> Result<Option<String>, TranslateError> {
        match column(name) {
            Some(value) => Ok(text_of(value)),
            None => Err(poison(format!("the outbox table has no column {name:?}"))),
        }
    };
    let aggregate_type = field_text(&outbox.aggregate_type_column)?.ok_or_else(|| poison(format!("column {:?} is NULL", outbox.aggregate_type_column)))?;
    let aggregate_id = field_text(&outbox.aggregate_id_column)?;
    let id = field_text(&outbox.id_column)?;
    let payload = match column(&outbox.payload_column) {
        None => return Err(poison(format!("the outbox table has no column {:?}", outbox.payload_column))),
        Some(Value::Null) => None,
        Some(Value::Bytea(bytes)) => Some(bytes.clone()),
        Some(value) => text_of(value).map(String::into_bytes),
    };
    let mut extra = Vec::new();
    for name in &outbox.header_columns {
        if let Some(value) = field_text(name)? {
            extra.push((name.clone(), value.into_bytes()));
        }
    }
    push_event(outbox, &table, aggregate_type, aggregate_id, id, payload, extra, position, out)
}

fn route_message(outbox: &OutboxConfig, prefix: &str, content: &[u8], position: Position, out: &mut Vec<Record>) -> Result<(), TranslateError> {
    let table = format!("message:{prefix}");
    let poison = |reason: String| TranslateError::Poison { table: table.clone(), reason };
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(content).map_err(|e| poison(format!("message content is not a JSON object: {e}")))?;
    let text = |name: &str| match object.get(name) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let aggregate_type = text(&outbox.aggregate_type_column).ok_or_else(|| poison(format!("message field {:?} is missing", outbox.aggregate_type_column)))?;
    let payload = match object.get(&outbox.payload_column) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone().into_bytes()),
        Some(other) => Some(other.to_string().into_bytes()),
    };
    let extra = outbox.header_columns.iter().filter_map(|name| text(name).map(|v| (name.clone(), v.into_bytes()))).collect();
    push_event(outbox, &table, aggregate_type, text(&outbox.aggregate_id_column), text(&outbox.id_column), payload, extra, position, out)
}

#[allow(clippy::too_many_arguments)]
fn push_event(
    outbox: &OutboxConfig,
    table: &str,
    aggregate_type: String,
    aggregate_id: Option<String>,
    id: Option<String>,
    payload: Option<Vec<u8>>,
    extra: Vec<(String, Vec<u8>)>,
    position: Position,
    out: &mut Vec<Record>,
) -> Result<(), TranslateError> {
    let topic = outbox.topic.replace("{aggregatetype}", &aggregate_type);
    if !valid_topic(&topic) {
        return Err(TranslateError::Poison {
            table: table.to_owned(),
            reason: format!("topic {topic:?} (from the aggregate type) is not a valid Kafka topic name"),
        });
    }
    let mut headers = Vec::with_capacity(extra.len() + 2);
    if let Some(id) = id {
        headers.push(("id".to_string(), id.into_bytes()));
    }
    headers.extend(extra);
    headers.push((HEADER_POSITION.into(), position_text(position).into_bytes()));
    out.push(Record { topic, key: aggregate_id.map(String::into_bytes), payload, headers });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_postgres::types::TypeKind;
    use sluice_postgres::{Column, Lsn, ReplicaIdentity};

    use super::*;

    fn relation(name: &str, columns: &[(&str, bool, TypeKind)]) -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|(name, is_key, kind)| Column { name: (*name).into(), type_oid: 0, type_modifier: -1, is_key: *is_key, kind: kind.clone() })
                .collect(),
        })
    }

    fn position(ordinal: u32) -> Position {
        Position { commit_lsn: Lsn(0x1000), tx_ordinal: ordinal }
    }

    fn header<'a>(record: &'a Record, name: &str) -> Option<&'a str> {
        record.headers.iter().find(|(n, _)| n == name).map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    fn outbox_relation() -> Arc<Relation> {
        relation(
            "outbox",
            &[("id", true, TypeKind::Uuid), ("aggregatetype", false, TypeKind::Text), ("aggregateid", false, TypeKind::Text), ("type", false, TypeKind::Text), ("payload", false, TypeKind::Jsonb)],
        )
    }

    fn outbox_translator() -> KafkaTranslator {
        let outbox: OutboxConfig = toml::from_str("table = \"public.outbox\"\nmessage_prefix = \"outbox\"").unwrap();
        KafkaTranslator::new("{schema}.{table}", HashMap::new(), true, Some(outbox))
    }

    #[test]
    fn an_outbox_row_becomes_one_event_on_its_aggregate_topic() {
        let event = ChangeEvent::Insert {
            position: position(2),
            relation: outbox_relation(),
            new: vec![
                Value::Uuid([1; 16]),
                Value::Text("Order".into()),
                Value::Text("o-17".into()),
                Value::Text("OrderCreated".into()),
                Value::Json("{\"total\": 9.50}".into()),
            ],
        };
        let mut out = Vec::new();
        outbox_translator().translate(&event, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        let record = &out[0];
        assert_eq!(record.topic, "outbox.event.Order");
        assert_eq!(record.key.as_deref(), Some(&b"o-17"[..]));
        assert_eq!(record.payload.as_deref(), Some(&b"{\"total\": 9.50}"[..]), "jsonb is kept as JSON text");
        assert_eq!(header(record, "id"), Some("01010101-0101-0101-0101-010101010101"));
        assert_eq!(header(record, "type"), Some("OrderCreated"));
        assert_eq!(header(record, HEADER_POSITION), Some("0/1000/2"));
    }

    #[test]
    fn an_outbox_row_without_payload_is_a_tombstone_and_one_without_aggregate_type_is_poison() {
        let translator = outbox_translator();
        let row = |aggregate_type: Value, payload: Value| ChangeEvent::Insert {
            position: position(0),
            relation: outbox_relation(),
            new: vec![Value::Uuid([2; 16]), aggregate_type, Value::Text("a".into()), Value::Text("Deleted".into()), payload],
        };
        let mut out = Vec::new();
        translator.translate(&row(Value::Text("Order".into()), Value::Null), &mut out).unwrap();
        assert_eq!(out[0].payload, None);
        let error = translator.translate(&row(Value::Null, Value::Null), &mut Vec::new()).unwrap_err();
        assert!(matches!(error, TranslateError::Poison { ref reason, .. } if reason.contains("aggregatetype")), "{error}");
        let error = translator.translate(&row(Value::Text("Order Lines".into()), Value::Null), &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("not a valid Kafka topic name"), "{error}");
    }

    #[test]
    fn outbox_updates_and_deletes_are_ignored_and_messages_route_like_rows() {
        let translator = outbox_translator();
        let mut out = Vec::new();
        let delete = ChangeEvent::Delete { position: position(1), relation: outbox_relation(), old: OldRow::Key(vec![Value::Uuid([3; 16]), Value::Null, Value::Null, Value::Null, Value::Null]) };
        translator.translate(&delete, &mut out).unwrap();
        assert!(out.is_empty());
        let message = ChangeEvent::Message {
            position: position(0),
            transactional: true,
            prefix: "outbox".into(),
            content: bytes::Bytes::from_static(br#"{"id":"e1","aggregatetype":"Customer","aggregateid":"c-1","type":"Renamed","payload":{"name":"Ada"}}"#),
        };
        translator.translate(&message, &mut out).unwrap();
        assert_eq!(out[0].topic, "outbox.event.Customer");
        assert_eq!(out[0].key.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(out[0].payload.as_deref(), Some(&br#"{"name":"Ada"}"#[..]));
        assert_eq!(header(&out[0], "id"), Some("e1"));
        let other = ChangeEvent::Message { position: position(0), transactional: true, prefix: "audit".into(), content: bytes::Bytes::from_static(b"x") };
        out.clear();
        translator.translate(&other, &mut out).unwrap();
        assert!(out.is_empty(), "messages with another prefix are not events");
    }

    #[test]
    fn cdc_changes_are_keyed_by_identity_and_deletes_and_key_changes_leave_tombstones() {
        let accounts = relation("accounts", &[("id", true, TypeKind::Int8), ("name", false, TypeKind::Text)]);
        let translator = KafkaTranslator::new("cdc.{schema}.{table}", HashMap::from([("public.special".to_string(), "special-topic".to_string())]), true, None);
        let mut out = Vec::new();
        let insert = ChangeEvent::Insert { position: position(0), relation: accounts.clone(), new: vec![Value::Int8(7), Value::Text("ada".into())] };
        translator.translate(&insert, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "cdc.public.accounts");
        assert_eq!(out[0].key.as_deref(), Some(&br#"{"id":7}"#[..]));
        let value: serde_json::Value = serde_json::from_slice(out[0].payload.as_ref().unwrap()).unwrap();
        assert_eq!(value["op"], "insert");
        assert_eq!(value["new"]["name"], "ada");
        assert_eq!(header(&out[0], HEADER_OP), Some("insert"));
        assert_eq!(header(&out[0], HEADER_TABLE), Some("public.accounts"));

        out.clear();
        let rekey = ChangeEvent::Update {
            position: position(1),
            relation: accounts.clone(),
            old: Some(OldRow::Key(vec![Value::Int8(7), Value::Null])),
            new: NewRow::Full(vec![Value::Int8(8), Value::Text("ada".into())]),
        };
        translator.translate(&rekey, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].key.as_deref(), Some(&br#"{"id":8}"#[..]));
        assert_eq!((out[1].key.as_deref(), out[1].payload.as_ref()), (Some(&br#"{"id":7}"#[..]), None), "the old key is tombstoned");

        out.clear();
        let delete = ChangeEvent::Delete { position: position(2), relation: accounts, old: OldRow::Key(vec![Value::Int8(8), Value::Null]) };
        translator.translate(&delete, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(header(&out[0], HEADER_OP), Some("delete"));
        assert_eq!((out[1].key.as_deref(), out[1].payload.as_ref()), (Some(&br#"{"id":8}"#[..]), None));

        out.clear();
        let special = relation("special", &[("id", true, TypeKind::Int8)]);
        translator.translate(&ChangeEvent::Insert { position: position(3), relation: special, new: vec![Value::Int8(1)] }, &mut out).unwrap();
        assert_eq!(out[0].topic, "special-topic");
    }
}
