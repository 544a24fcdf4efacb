//! Change events to Kafka records: pure, no I/O.
//!
//! Plain CDC: a row change becomes one record on the table's topic (`topic` template over
//! `{schema}` and `{table}`, or a per-table override). The key is the JSON object of the
//! replica-identity columns (`{"id":42}`); the value is the change as the jsonl target writes
//! it (operation, table, position, old and new row); headers carry the operation, the table
//! and the position. A delete is followed by a tombstone for its key (`tombstones_on_delete`),
//! and so is an update that changes the key, so that compacted topics forget the old key.
//!
//! Outbox events (`translate::outbox` routes them) become one record each: topic from the
//! aggregate type (template `outbox.event.{aggregatetype}`), key = `aggregateid`, value =
//! `payload` (json/jsonb kept as JSON text, bytea as bytes, a NULL payload is a tombstone),
//! headers `id` (the event id), the configured header columns, and the source position.

use std::collections::HashMap;
use std::sync::Arc;

use sluice_kafka::Record;

use super::config::KafkaConfig;
use super::format;
use crate::translate::outbox::{OutboxConfig, OutboxEvent, Routed};
use crate::translate::{Context, TranslateError, Translator};
use sluice_core::{ChangeEvent, NewRow, OldRow, Position, Relation, Value};

/// Table changes to plain CDC records, outbox rows and messages to events.
pub struct KafkaTranslator {
    topic: String,
    topics: HashMap<String, String>,
    tombstones_on_delete: bool,
    outbox: Option<OutboxConfig>,
    /// Each table's `sluice.relation` header, by OID, with the relation it was built for.
    relation_headers: HashMap<u32, (Arc<Relation>, Vec<u8>)>,
    /// The commit time of the transaction being translated (from its Begin).
    commit_time: Option<i64>,
}

/// Header names.
pub const HEADER_OP: &str = "sluice.op";
pub const HEADER_TABLE: &str = "sluice.table";
pub const HEADER_POSITION: &str = "sluice.position";

impl Translator for KafkaTranslator {
    type Op = Record;

    fn translate(
        &mut self,
        event: &ChangeEvent,
        _context: &Context,
        out: &mut Vec<Record>,
    ) -> Result<(), TranslateError> {
        KafkaTranslator::translate(self, event, out)
    }
}

impl KafkaTranslator {
    /// The translator a Kafka target's configuration describes.
    pub fn open(config: &KafkaConfig) -> Self {
        KafkaTranslator::new(
            &config.topic,
            config.topics.clone(),
            config.tombstones_on_delete,
            config.outbox.clone(),
        )
    }

    pub fn new(
        topic: &str,
        topics: HashMap<String, String>,
        tombstones_on_delete: bool,
        outbox: Option<OutboxConfig>,
    ) -> Self {
        KafkaTranslator {
            topic: topic.to_owned(),
            topics,
            tombstones_on_delete,
            outbox,
            relation_headers: HashMap::new(),
            commit_time: None,
        }
    }

    /// The records for one event, appended to `out` in the order they must be produced.
    pub fn translate(&mut self, event: &ChangeEvent, out: &mut Vec<Record>) -> Result<(), TranslateError> {
        match event {
            ChangeEvent::Begin { commit_time, .. } => self.commit_time = Some(commit_time.0),
            ChangeEvent::Commit { .. } => self.commit_time = None,
            _ => {}
        }
        if let Some(outbox) = &self.outbox {
            match outbox.route(event) {
                Ok(Routed::Event(routed)) => return push_event(outbox, routed, out),
                Ok(Routed::Ignored) => return Ok(()),
                Ok(Routed::NotOutbox) => {}
                Err(poison) => {
                    return Err(TranslateError::Poison {
                        table: poison.table,
                        column: None,
                        reason: poison.reason,
                    })
                }
            }
        }
        let (relation, position, op) = match event {
            ChangeEvent::Insert { relation, position, snapshot, .. } => {
                (relation, *position, if *snapshot { "read" } else { "insert" })
            }
            ChangeEvent::Update { relation, position, .. } => (relation, *position, "update"),
            ChangeEvent::Delete { relation, position, .. } => (relation, *position, "delete"),
            ChangeEvent::Truncate { relations, position, .. } => {
                for relation in relations {
                    let mut value = Vec::new();
                    crate::json::write_event(&mut value, event, false);
                    trim_newline(&mut value);
                    out.push(Record {
                        topic: self.topic_for(relation),
                        key: None,
                        payload: Some(value),
                        headers: self.headers("truncate", relation, *position),
                    });
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        let topic = self.topic_for(relation);
        let key = match event {
            ChangeEvent::Insert { new, .. } => key_json(relation, new.iter().map(Some)),
            ChangeEvent::Update { new: NewRow::Full(values), .. } => {
                key_json(relation, values.iter().map(Some))
            }
            ChangeEvent::Update { new: NewRow::Partial(values), .. } => {
                key_json(relation, values.iter().map(Option::as_ref))
            }
            ChangeEvent::Delete { old, .. } => key_json(relation, old.values().iter().map(Some)),
            _ => None,
        };
        let mut value = Vec::new();
        crate::json::write_event(&mut value, event, false);
        trim_newline(&mut value);
        out.push(Record {
            topic: topic.clone(),
            key: key.clone(),
            payload: Some(value),
            headers: self.headers(op, relation, position),
        });
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
                out.push(Record {
                    topic,
                    key: Some(dead_key),
                    payload: None,
                    headers: self.headers("tombstone", relation, position),
                });
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

impl KafkaTranslator {
    /// A CDC record's headers: operation, table, position, the table's shape (so that the
    /// Kafka source can read the values back typed) and, inside a transaction, its commit time.
    fn headers(&mut self, op: &str, relation: &Arc<Relation>, position: Position) -> Vec<(String, Vec<u8>)> {
        let shape = match self.relation_headers.get(&relation.oid) {
            Some((known, header)) if Arc::ptr_eq(known, relation) || **known == **relation => header.clone(),
            _ => {
                let header = format::relation_header(relation);
                self.relation_headers.insert(relation.oid, (Arc::clone(relation), header.clone()));
                header
            }
        };
        let mut headers = vec![
            (HEADER_OP.into(), op.as_bytes().to_vec()),
            (HEADER_TABLE.into(), relation.qualified_name().into_bytes()),
            (HEADER_POSITION.into(), position.to_string().into_bytes()),
            (format::HEADER_RELATION.into(), shape),
        ];
        if let Some(commit_time) = self.commit_time {
            headers.push((format::HEADER_COMMIT_TIME.into(), commit_time.to_string().into_bytes()));
        }
        headers
    }
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
    !topic.is_empty()
        && topic.len() <= 249
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn push_event(
    outbox: &OutboxConfig,
    event: OutboxEvent,
    out: &mut Vec<Record>,
) -> Result<(), TranslateError> {
    let topic = outbox.topic.replace("{aggregatetype}", &event.aggregate_type);
    if !valid_topic(&topic) {
        return Err(TranslateError::Poison {
            table: event.source,
            column: None,
            reason: format!("topic {topic:?} (from the aggregate type) is not a valid Kafka topic name"),
        });
    }
    let mut headers = Vec::with_capacity(event.headers.len() + 2);
    if let Some(id) = event.id {
        headers.push(("id".to_string(), id.into_bytes()));
    }
    headers.extend(event.headers.into_iter().map(|(name, value)| (name, value.into_bytes())));
    headers.push((HEADER_POSITION.into(), event.position.to_string().into_bytes()));
    out.push(Record {
        topic,
        key: event.aggregate_id.map(String::into_bytes),
        payload: event.payload.map(|p| p.into_bytes()),
        headers,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_core::Lsn;
    use sluice_core::TypeKind;

    use super::*;
    use crate::translate::outbox::tests::{outbox_relation, relation};

    fn position(ordinal: u32) -> Position {
        Position { commit_lsn: Lsn(0x1000), tx_ordinal: ordinal }
    }

    fn header<'a>(record: &'a Record, name: &str) -> Option<&'a str> {
        record.headers.iter().find(|(n, _)| n == name).map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    fn outbox_translator() -> KafkaTranslator {
        let outbox: OutboxConfig =
            toml::from_str("table = \"public.outbox\"\nmessage_prefix = \"outbox\"").unwrap();
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
            snapshot: false,
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
        let mut translator = outbox_translator();
        let row = |aggregate_type: Value, payload: Value| ChangeEvent::Insert {
            position: position(0),
            relation: outbox_relation(),
            new: vec![
                Value::Uuid([2; 16]),
                aggregate_type,
                Value::Text("a".into()),
                Value::Text("Deleted".into()),
                payload,
            ],
            snapshot: false,
        };
        let mut out = Vec::new();
        translator.translate(&row(Value::Text("Order".into()), Value::Null), &mut out).unwrap();
        assert_eq!(out[0].payload, None);
        let error = translator.translate(&row(Value::Null, Value::Null), &mut Vec::new()).unwrap_err();
        assert!(
            matches!(error, TranslateError::Poison { ref reason, .. } if reason.contains("aggregatetype")),
            "{error}"
        );
        let error = translator
            .translate(&row(Value::Text("Order Lines".into()), Value::Null), &mut Vec::new())
            .unwrap_err();
        assert!(error.to_string().contains("not a valid Kafka topic name"), "{error}");
    }

    #[test]
    fn outbox_updates_and_deletes_are_ignored_and_messages_route_like_rows() {
        let mut translator = outbox_translator();
        let mut out = Vec::new();
        let delete = ChangeEvent::Delete {
            position: position(1),
            relation: outbox_relation(),
            old: OldRow::Key(vec![Value::Uuid([3; 16]), Value::Null, Value::Null, Value::Null, Value::Null]),
        };
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
        let other = ChangeEvent::Message {
            position: position(0),
            transactional: true,
            prefix: "audit".into(),
            content: bytes::Bytes::from_static(b"x"),
        };
        out.clear();
        translator.translate(&other, &mut out).unwrap();
        assert!(out.is_empty(), "messages with another prefix are not events");
    }

    #[test]
    fn cdc_changes_are_keyed_by_identity_and_deletes_and_key_changes_leave_tombstones() {
        let accounts = relation("accounts", &[("id", true, TypeKind::Int8), ("name", false, TypeKind::Text)]);
        let mut translator = KafkaTranslator::new(
            "cdc.{schema}.{table}",
            HashMap::from([("public.special".to_string(), "special-topic".to_string())]),
            true,
            None,
        );
        let mut out = Vec::new();
        let insert = ChangeEvent::Insert {
            position: position(0),
            relation: Arc::clone(&accounts),
            new: vec![Value::Int8(7), Value::Text("ada".into())],
            snapshot: false,
        };
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
            relation: Arc::clone(&accounts),
            old: Some(OldRow::Key(vec![Value::Int8(7), Value::Null])),
            new: NewRow::Full(vec![Value::Int8(8), Value::Text("ada".into())]),
        };
        translator.translate(&rekey, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].key.as_deref(), Some(&br#"{"id":8}"#[..]));
        assert_eq!(
            (out[1].key.as_deref(), out[1].payload.as_ref()),
            (Some(&br#"{"id":7}"#[..]), None),
            "the old key is tombstoned"
        );

        out.clear();
        let delete = ChangeEvent::Delete {
            position: position(2),
            relation: accounts,
            old: OldRow::Key(vec![Value::Int8(8), Value::Null]),
        };
        translator.translate(&delete, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(header(&out[0], HEADER_OP), Some("delete"));
        assert_eq!((out[1].key.as_deref(), out[1].payload.as_ref()), (Some(&br#"{"id":8}"#[..]), None));

        out.clear();
        let special = relation("special", &[("id", true, TypeKind::Int8)]);
        translator
            .translate(
                &ChangeEvent::Insert {
                    position: position(3),
                    relation: special,
                    new: vec![Value::Int8(1)],
                    snapshot: false,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(out[0].topic, "special-topic");
    }

    #[test]
    fn a_backfilled_row_is_a_read_keyed_like_an_insert() {
        let accounts = relation("accounts", &[("id", true, TypeKind::Int8), ("name", false, TypeKind::Text)]);
        let mut translator = KafkaTranslator::new("cdc.{schema}.{table}", HashMap::new(), true, None);
        let mut out = Vec::new();
        let read = ChangeEvent::Insert {
            position: position(0),
            relation: accounts,
            new: vec![Value::Int8(7), Value::Text("ada".into())],
            snapshot: true,
        };
        translator.translate(&read, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key.as_deref(), Some(&br#"{"id":7}"#[..]));
        let value: serde_json::Value = serde_json::from_slice(out[0].payload.as_ref().unwrap()).unwrap();
        assert_eq!(value["op"], "read");
        assert_eq!(value["new"]["name"], "ada");
        assert_eq!(header(&out[0], HEADER_OP), Some("read"));
    }
}
